"""The benchmark report as tables: a rich table for the terminal, markdown, and the JSON file.

Everything here reads the dict `harness.run_bench` returns; nothing is measured or estimated.
"""

from __future__ import annotations

import json
from pathlib import Path

from leapllm.benchmarking.systems import QUANTIZED
from leapllm.output_files import atomic_write

RATIO_CAPTION = ("Ratios of medians (speed > 1: leapllm faster; TTFT columns are the peer's time to first token / "
                 "leapllm's, so > 1: leapllm answers sooner; memory < 1: leapllm smaller)")
CELL_FOR_STATUS = {"missing": "missing", "failed": "failed", "broken": "broken"}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def figure_unit(f: dict) -> str:
    return f.get("unit", "tok/s")  # reports written before serve figures have tok/s only


def figure_note(e: dict, f: dict) -> str:
    return e["notes"].get(f.get("source", f["key"]), "")


def title(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    where = m["gpu"] or m["cpu"]
    contended = f", {s['contend']} core(s) taken by busy loops" if s.get("contend") else ""
    return (f"leapllm vs peers, {report['model']}, {where}, threads={s['threads']}{contended}, "
            f"median of {s['repeats']}")


def legend(report: dict) -> str:
    s = report["settings"]
    memory = ("GPU memory allocated by torch above what was allocated before loading: its peak, and what "
              "stayed allocated after loading (llama.cpp: n/a)"
              if s["device"] == "cuda" else
              "the worker process's RSS above its RSS after importing its libraries: its peak (VmHWM, load "
              "temporaries included), and what stayed resident after loading")
    serve = ""
    if s.get("serve_batches"):
        serve = (f" Serve bN: N requests arrive at once, each with its own {s['serve_prompt_len']}-token prompt, "
                 f"{s['serve_output_tokens']} greedy tokens each (EOS ignored); tokens/s = N x "
                 f"{s['serve_output_tokens']} / time until the last request is done, prefill included (leapllm: "
                 "its continuous-batching engine with the paged KV cache; llama.cpp: one context with a sequence "
                 "per request, prompts prefilled in batches, then one batch per step). TTFT bN: mean time from "
                 "arrival to a request's first token, ms (TTFT max bN: the slowest request's); transformers has "
                 "no continuous batching (unsupported).")
        memory += "; both read before the serve figures run (the JSON has the peak after them: serve_peak_memory_mib)"
    chat = ""
    if s.get("chat_decode_tokens"):
        prompts = report.get("chat_prompts") or []
        n = s["chat_decode_tokens"]
        chat = (f" Chat decode b1: {n} greedy tokens (EOS ignored) after each of {len(prompts)} chat prompts "
                f"({', '.join(p['kind'] for p in prompts)}: one user message in the model's chat template), one "
                f"prompt after another; tokens/s = {len(prompts)} x {n - 1} / their summed decode time.")
    batched = ""
    if s.get("batches", True):  # reports written before --batches none always had them
        batched = (f" Decode bN total: N rows with the same {s['decode_prompt_len']}-token prompt, "
                   f"{s['batch_decode_tokens']} greedy tokens each, all rows' tokens/s (decode time only).")
    speculative = ""
    if any(e.get("speculative") for e in report["systems"]):
        speculative = (f" A +ngram / +draft system is its base system (the name before the +) with speculative "
                       f"decoding: prompt lookup or the draft model proposes up to "
                       f"{s.get('num_speculative_tokens', 4)} tokens a step, which the model checks in one pass; "
                       "its greedy tokens must be its base's, token for token, or it is broken.")
    return (f"Prefill: one prompt of N tokens, tokens/s. Decode b1: {s['decode_tokens']} greedy tokens after a "
            f"{s['decode_prompt_len']}-token prompt, decode time only.{chat}{batched}{serve}{speculative} "
            f"Peak / resident MiB: {memory}. Load s: the model's load, each system loading alone; first token ms: "
            "the prefill of a short prompt (8 tokens) right after, what the system left for its first request "
            "included (llama.cpp: its weights paged in from the memory map).")


def header_line(report: dict) -> str:
    m = report["machine"]
    where = m["gpu"] or m["cpu"]
    versions = [f"torch {m['torch']}"]
    versions += [f"{name} {m[key]}" for key, name in (("transformers", "transformers"),
                                                       ("llama_cpp_python", "llama-cpp-python")) if m.get(key)]
    return (f"{report['date']} · {where} ({m['cores']} cores, threads={m['threads']}, {', '.join(versions)}) · "
            f"`{report['command']}`")


def main_table(report: dict) -> tuple[list[str], list[list[str]]]:
    figures = report["figures"]
    header = (["system"] + [f"{f['label']} {figure_unit(f)}" for f in figures] + ["peak MiB", "resident MiB"]
              + ["load s", "first token ms", f"greedy agree (of {report['settings']['decode_tokens']})"])
    rows = []
    for e in report["systems"]:
        if e["status"] != "ok":
            word = CELL_FOR_STATUS.get(e["status"], e["status"])
            rows.append([e["name"]] + [word] * (len(figures) + 4)
                        + [str(e["greedy_agreement"]) if e["greedy_agreement"] is not None else ""])
            continue
        cells = []
        for f in figures:
            note = figure_note(e, f)
            if f["key"] in e["figures"]:
                cells.append(f"{e['figures'][f['key']]:.1f}")
            elif note.startswith("not supported"):
                cells.append("unsupported")
            elif note.startswith("withheld"):
                cells.append("withheld")
            else:
                cells.append("n/a")
        if e["name"] == report["reference"]:
            agree = "ref"
        elif e["greedy_agreement"] is None:
            agree = "n/a"
        else:
            agree = str(e["greedy_agreement"])
        first = e.get("first_token_s")
        rows.append([e["name"]] + cells + [fmt(e["peak_memory_mib"], ".0f"), fmt(e["resident_memory_mib"], ".0f"),
                                           fmt(e.get("load_s"), ".2f"), fmt(None if first is None else 1000 * first,
                                                                            ".0f"), agree])
    return header, rows


def ratio_table(report: dict) -> tuple[list[str], list[list[str]]]:
    figures = [f for f in report["figures"] if f.get("ratio", True)]
    header = (["leapllm / peer"]
              + [f["label"] + (" (peer / leapllm)" if f.get("better") == "lower" else "") for f in figures]
              + ["peak memory", "resident memory", "load (peer / leapllm)", "load + first token (peer / leapllm)"])
    keys = [f["key"] for f in figures] + ["peak_memory_mib", "resident_memory_mib", "load_s", "cold_start_s"]
    rows = [[pair] + [fmt(r.get(k), ".2f") for k in keys] for pair, r in report["ratios"].items()]
    return header, rows


def acceptance(counts: dict) -> str:
    proposed, accepted = counts.get("proposed", 0), counts.get("accepted", 0)
    if not proposed:
        return "none proposed"
    return f"{accepted / proposed:.2f} ({accepted}/{proposed})"


def summed(counts: list[dict]) -> dict:
    return {k: sum(c.get(k, 0) for c in counts) for k in ("proposed", "accepted")}


def speculation_notes(report: dict, e: dict) -> list[str]:
    """A speculative system's check against its base, what it gained over it, and its acceptance
    rates (accepted / proposed): per chat prompt kind, from the last repeat (the controller turns
    speculation off and on from measured times, so repeats may propose differently)."""
    if not e.get("speculative") or e["status"] != "ok":
        return []
    name, labels = e["name"], {f["key"]: f["label"] for f in report["figures"]}
    out = []
    if e.get("speculation_check"):
        out.append(f"{name}: greedy tokens {e['speculation_check']}")
    if e.get("speedup_over_base"):
        gains = ", ".join(f"{labels.get(k, k)} x{v:.2f}" for k, v in e["speedup_over_base"].items())
        out.append(f"{name} over {e['base']} (same run, ratio of medians): {gains}")
    parts = []
    decode = (e["runs"].get("decode") or [{}])[-1].get("speculation")
    if isinstance(decode, dict):
        parts.append(f"{labels.get('decode', 'decode')} {acceptance(decode)}")
    chat = (e["runs"].get("decode_chat") or [{}])[-1].get("speculation")
    if isinstance(chat, list) and chat:
        kinds = [p["kind"] for p in report.get("chat_prompts") or []]
        per_kind = ", ".join(f"{kinds[i] if i < len(kinds) else i} {acceptance(c)}" for i, c in enumerate(chat))
        parts.append(f"{labels.get('decode_chat', 'decode_chat')}: {per_kind}; all prompts {acceptance(summed(chat))}")
    if parts:
        out.append(f"{name} acceptance (accepted / proposed, last repeat): {'; '.join(parts)}")
    if report["settings"].get("batches", True) or report["settings"].get("serve_batches"):
        out.append(f"{name}: its decode bN figures are the plain batched loop (no speculation), and its serving "
                   "engine speculates only while few sequences decode (the JSON's info.speculation says how few), "
                   "so its serve bN figures with more requests are its base's engine at work")
    return out


def notes(report: dict) -> list[str]:
    out = list(report.get("notes") or [])
    for e in report["systems"]:
        if e["status"] != "ok":
            out.append(f"{e['name']} {e['status']}: {e['reason']}")
        for key, note in e["notes"].items():
            out.append(f"{e['name']} {key}: {note}")
        out += speculation_notes(report, e)
        if e["engine"] == "llamacpp" and e["status"] == "ok":
            out.append(f"{e['name']} runs the file's quantized weights with its own kernels (leapllm's float "
                       "systems and transformers dequantize them at load), so its greedy tokens may part from "
                       "float32's: reported, not failed")
        if e["engine"] == "llamacpp" and (e.get("info") or {}).get("system_info"):
            out.append(f"{e['name']} build: {e['info']['system_info']}")
        weights = (e.get("info") or {}).get("weights", "")
        quantization = QUANTIZED.get(e["dtype"]) if e["engine"] == "leapllm" else None
        if quantization and e["status"] == "ok":
            # A speculative system's tokens are held to its base's exactly (speculation_notes), not to float32's.
            against = (f" against {report['reference']}'s (against its base {e['base']}'s they must be identical)"
                       if e.get("speculative") else "")
            out.append(f"{e['name']} quantizes the dequantized weights at load ({weights or quantization.weights}; "
                       f"float32 activations), the precision llama.cpp has on {quantization.llamacpp}: its greedy "
                       f"tokens are reported{against}, not failed")
        if e["engine"] == "hf" and "packed" in weights:
            out.append(f"{e['name']} ran with {weights}, not dequantized weights")
    return out


def floor_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Each system's batch-1 decode against the floor of its dtype (random-weight runs only)."""
    floor = report.get("floor")
    if not floor:
        return [], []
    rows = []
    for e in report["systems"]:
        share = floor["decode_fraction_of_floor"].get(e["name"])
        if share is None:
            continue
        f = floor["by_dtype"][e["dtype"]]
        rows.append([e["name"], fmt(e["figures"].get("decode"), ".1f"), f"{f['step_bytes'] / 1e6:,.1f}",
                     f"{f['tokens_per_s']:,.0f}", f"{100 * share:.0f}%"])
    return ["system", "decode b1 tok/s", "MB read per step", "floor tok/s", "of floor"], rows


def floor_caption(report: dict) -> str:
    floor = report["floor"]
    return (f"Decode floor of the {floor['shape']} shape (random weights): every weight and the cached keys and "
            f"values of ~{floor['context']:.0f} earlier tokens read once per "
            f"step, at {floor['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s (torch.sum over 1 GiB, measured after the "
            "systems ran)")


def markdown(report: dict) -> str:
    lines = [header_line(report), "", f"{title(report)}. {legend(report)}", ""]
    tables = [(main_table(report), None), (ratio_table(report), RATIO_CAPTION)]
    if report.get("floor"):
        tables.append((floor_table(report), floor_caption(report)))
    for (header, rows), caption in tables:
        if not rows:
            continue
        if caption:
            lines += [f"{caption}:", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    extra = notes(report)
    if extra:
        lines += ["Notes:", ""] + [f"- {n}" for n in extra] + [""]
    return "\n".join(lines)


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 140))  # a pipe's 80 columns would cut names
    tables = [(main_table(report), title(report)), (ratio_table(report), RATIO_CAPTION)]
    if report.get("floor"):
        tables.append((floor_table(report), floor_caption(report)))
    for (header, rows), caption in tables:
        if not rows:
            continue
        table = Table(title=caption)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(legend(report), highlight=False)
    for note in notes(report):
        console.print(f"note: {note}", highlight=False, markup=False)


def write_json(report: dict, path: str | Path) -> None:
    atomic_write(path, json.dumps(report, indent=2) + "\n")


def write_markdown(report: dict, path: str | Path) -> None:
    atomic_write(path, markdown(report) + "\n")
