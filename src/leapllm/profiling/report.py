"""Presenting a profile: a rich terminal table, JSON, and a self-contained HTML report with plots.

Everything here reads the JSON-ready dict that `profile_model` returns (with `sweep_model`'s result
under "sweep" when there is one), so a report can be rebuilt from a saved JSON file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from leapllm.output_files import atomic_write
from leapllm.profiling.stages import LAYER_STAGES, STAGE_LABELS, STAGES

PHASES = ("prefill", "decode")

# One colour per stage, the same in every plot: attention's parts in blues/red, the MLP's in
# oranges/green, and "other" in grey.
STAGE_COLORS = {
    "embedding": "#8c564b",
    "norm": "#bcbd22",
    "qkv_proj": "#1f77b4",
    "rotary": "#9edae5",
    "attention": "#d62728",
    "o_proj": "#aec7e8",
    "gate_up_proj": "#ff7f0e",
    "activation": "#ffbb78",
    "down_proj": "#2ca02c",
    "lm_head": "#9467bd",
    "sampling": "#e377c2",
    "other": "#7f7f7f",
}
SHORT_LABELS = {
    "embedding": "embed", "norm": "norms", "qkv_proj": "qkv", "rotary": "rotary", "attention": "attention",
    "o_proj": "o_proj", "gate_up_proj": "gate/up", "activation": "act", "down_proj": "down",
    "lm_head": "head", "sampling": "sampling", "other": "other",
}


# -- numbers --------------------------------------------------------------------------------------
def _finite(value):
    """The same structure with NaN/inf floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(data: dict) -> str:
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def write_json(data: dict, path: str | Path) -> None:
    atomic_write(path, to_json(data))


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f}"


def _pct(fraction) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def _scaled(value, scale: float, digits: int = 2) -> str:
    if value is None:
        return "-"
    v = value / scale
    return f"{v:,.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def _rate(value, unit: str) -> str:
    """A rate with an SI prefix: 1.2 GB/s, 340 MFLOP/s."""
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _phase_title(name: str, phase: dict, settings: dict) -> str:
    batch = settings["batch"]
    if name == "prefill":
        return (f"prefill: {batch} x {settings['prompt_len']} tokens in {_ms(phase['hook_free_total_s'])} ms "
                f"({phase['tokens_per_s']:,.0f} tokens/s)")
    return (f"decode: {phase['steps']} steps of batch {batch}, {_ms(phase['seconds_per_step'])} ms per step "
            f"({phase['tokens_per_s']:,.1f} tokens/s)")


def check_line(name: str, phase: dict) -> str:
    c = phase["check"]
    verdict = "within" if c["ok"] else "NOT within"
    line = (f"{name}: stages + other = {_ms(c['stages_plus_other_s'])} ms, measured without hooks "
            f"{_ms(c['hook_free_total_s'])} ms: {c['relative_difference'] * 100:.1f}% apart, {verdict} "
            f"{c['tolerance'] * 100:.0f}% (the hooks cost {_ms(phase['profiler_overhead_s'])} ms)")
    if not c["ok"]:
        if phase["profiler_overhead_s"] > 0:
            line += (". Either the machine was busy (try --repeats 3) or, if it persists, the hooks' own time is a "
                     "large part of this step: it is bound by launching many small ops from Python (on a GPU, idle "
                     "between kernels), so each stage's time includes some hook time; the hook-free total is the "
                     "true time, the shares are rough")
        else:
            line += ". The run without hooks was the slower one: the machine was busy; try --repeats 3"
    return line


def floor_line(phase: dict, machine: dict | None) -> str | None:
    """Decode against its bandwidth floor: the bytes one step reads (weights, KV cache, activations)
    at the measured streaming bandwidth, the fastest a memory-bound step can be."""
    if not machine or not phase["steps"] or not phase["seconds_per_step"]:
        return None
    step_bytes = phase["bytes"] / phase["steps"]
    floor = step_bytes / machine["bandwidth"]
    return (f"decode floor: {step_bytes / 1e6:,.1f} MB read per step at {_rate(machine['bandwidth'], 'B/s')} = "
            f"{_ms(floor)} ms; a step takes {_ms(phase['seconds_per_step'])} ms, "
            f"{floor / phase['seconds_per_step'] * 100:.0f}% of the floor's speed")


def beyond_peak(data: dict) -> list[str]:
    """Stages that ran faster than the measured peak (the measurement was disturbed)."""
    found = []
    for name in PHASES:
        for stage, row in data["phases"][name]["stages"].items():
            if (row["peak_flops_fraction"] or 0) > 1.0 or (row["peak_bandwidth_fraction"] or 0) > 1.0:
                found.append(f"{name} {STAGE_LABELS[stage]}")
    return found


def peak_warning(data: dict) -> str | None:
    found = beyond_peak(data)
    if not found:
        return None
    return (f"note: {', '.join(found)} ran above the measured peak, so the machine was busy when its limits were "
            "measured; measure again on a quiet machine with `leapllm profile --machine`")


def machine_line(machine: dict | None, dtype: str) -> str:
    if not machine:
        return "machine limits: not measured (no fractions of peak, no bound)"
    flops = machine["flops"].get(dtype) or machine["flops"].get("bfloat16") or machine["flops"]["float32"]
    return (f"machine: {machine['name']} ({machine['device']}, {machine['threads']} threads): "
            f"{_rate(machine['bandwidth'], 'B/s')} streaming read, {_rate(flops, 'FLOP/s')} {dtype} matmul, "
            f"balance {flops / machine['bandwidth']:.1f} FLOP/byte"
            + (f"; {_rate(machine['flops']['int8'], 'op/s')} int8 on the kernels' tiles" if "int8" in machine["flops"]
               else ""))


# -- terminal ------------------------------------------------------------------------------------
COLUMNS = ("stage", "ms", "% time", "GFLOP", "MB moved", "GFLOP/s", "GB/s", "% peak FLOP/s", "% peak BW", "bound")


def stage_table_rows(phase: dict) -> list[list[str]]:
    rows = []
    for stage in STAGES:
        r = phase["stages"][stage]
        rows.append([STAGE_LABELS[stage], _ms(r["seconds"]), _pct(r["share"]), _scaled(r["flops"], 1e9, 3),
                     _scaled(r["bytes"], 1e6, 1), _scaled(r["flop_per_s"], 1e9, 2), _scaled(r["bytes_per_s"], 1e9, 2),
                     _pct(r["peak_flops_fraction"]), _pct(r["peak_bandwidth_fraction"]), r["bound"] or "-"])
    rate = (lambda v: _scaled(phase[v] / phase["total_s"], 1e9, 2)) if phase["total_s"] > 0 else (lambda v: "-")
    rows.append(["total", _ms(phase["total_s"]), "100.0%", _scaled(phase["flops"], 1e9, 3),
                 _scaled(phase["bytes"], 1e6, 1), rate("flops"), rate("bytes"), "", "", ""])
    return rows


def per_layer_rows(phase: dict) -> list[list[str]]:
    rows = [[str(entry["layer"])] + [_ms(entry["seconds"][s]) for s in LAYER_STAGES] + [_ms(entry["total_s"])]
            for entry in phase["per_layer"]]
    outside = phase["outside_layers"]
    rows.append(["outside"] + [_ms(outside.get(s)) if s in outside else "" for s in LAYER_STAGES]
                + [_ms(sum(outside.values()))])
    return rows


def print_tables(data: dict, console=None, per_layer: bool = False) -> None:
    """Print the stage table of each phase (and the per-layer tables) with rich."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
            console = Console(width=max(console.width, 150))
    model, settings = data["model"], data["settings"]
    console.print(f"[bold]{escape(model['name'] or model['architecture'])}[/bold]: {model['layers']} layers, "
                  f"{model['dtype']} on {model['device']}, {data['runtime']['threads']} threads, torch "
                  f"{data['runtime']['torch']}")
    console.print(machine_line(data.get("machine"), model["dtype"]), markup=False)
    for name in PHASES:
        phase = data["phases"][name]
        table = Table(title=_phase_title(name, phase, settings), title_justify="left")
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i == 0 or col == "bound" else "right")
        rows = stage_table_rows(phase)
        for i, row in enumerate(rows):
            table.add_row(*row, end_section=i == len(rows) - 2, style="bold" if i == len(rows) - 1 else None)
        console.print(table)
        console.print(check_line(name, phase), markup=False)
        floor = floor_line(phase, data.get("machine")) if name == "decode" else None
        if floor:
            console.print(floor, markup=False)
        if per_layer:
            lt = Table(title=f"{name}: ms per layer", title_justify="left")
            for col in ("layer",) + tuple(SHORT_LABELS[s] for s in LAYER_STAGES) + ("total",):
                lt.add_column(col, justify="right")
            for row in per_layer_rows(phase):
                lt.add_row(*row)
            console.print(lt)
    warning = peak_warning(data)
    if warning:
        console.print(warning, style="yellow", markup=False)
    sweep = data.get("sweep")
    if sweep:
        _print_sweep(console, sweep)


def _print_sweep(console, sweep: dict) -> None:
    from rich.table import Table

    shown = [s for s in STAGES if s not in ("embedding", "sampling")]
    if sweep["prefill"]["points"]:
        t = Table(title="sweep: prefill ms by stage as the prompt grows (batch 1)", title_justify="left")
        for col in ("prompt",) + tuple(SHORT_LABELS[s] for s in shown) + ("total", "attention %"):
            t.add_column(col, justify="right")
        for p in sweep["prefill"]["points"]:
            t.add_row(str(p["prompt_len"]), *[_ms(p["seconds"][s]) for s in shown], _ms(p["total_s"]),
                      _pct(p["attention_share"]))
        console.print(t)
    if sweep["decode"]["points"]:
        t = Table(title=f"sweep: one decode step's ms by stage as the batch grows ({sweep['decode']['context']} "
                        "tokens cached)", title_justify="left")
        for col in ("batch",) + tuple(SHORT_LABELS[s] for s in shown) + ("step", "ms/token", "FLOP/byte"):
            t.add_column(col, justify="right")
        for p in sweep["decode"]["points"]:
            t.add_row(str(p["batch"]), *[_ms(p["seconds"][s]) for s in shown], _ms(p["step_s"]),
                      _ms(p["seconds_per_token"]), f"{p['projection_intensity']:.1f}")
        console.print(t)


# -- plots ---------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_stage_bars(data: dict):
    """Two 100%-stacked bars: the prefill, and one decode step, split by stage."""
    fig = _new_figure(10, 3.8)
    ax = fig.add_subplot()
    settings = data["settings"]
    labels = []
    for row, name in enumerate(PHASES):
        phase = data["phases"][name]
        if name == "prefill":
            labels.append(f"prefill\n{_ms(phase['hook_free_total_s'])} ms\n{settings['batch']} x "
                          f"{settings['prompt_len']} tokens")
        else:
            labels.append(f"decode\n{_ms(phase['seconds_per_step'])} ms per step\nbatch {settings['batch']}")
        left = 0.0
        for stage in STAGES:
            share = max(phase["stages"][stage]["share"], 0.0) * 100
            ax.barh(row, share, left=left, color=STAGE_COLORS[stage], edgecolor="white", linewidth=0.5,
                    label=STAGE_LABELS[stage] if row == 0 else None)
            if share >= 6:
                ax.text(left + share / 2, row, f"{SHORT_LABELS[stage]}\n{share:.0f}%", ha="center", va="center",
                        fontsize=8)
            left += share
    ax.set_yticks(range(len(PHASES)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the phase's time")
    ax.set_title("Where the time goes, stage by stage")
    ax.legend(ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=8, frameon=False)
    return fig


def _roofline_points(data: dict):
    for name in PHASES:
        for stage, row in data["phases"][name]["stages"].items():
            if row["flops"] and row["seconds"] > 0 and row["intensity"]:
                yield name, stage, row["intensity"], row["flop_per_s"]


def _label_clusters(points, spread: float = 1.6):
    """One label per group of points of a phase that sit within a factor `spread` of each other on
    both axes (the decode projections all land on the same spot), so labels do not overprint."""
    clusters: list[tuple[str, float, float, list[str]]] = []
    for name, stage, x, y in sorted(points, key=lambda p: (p[0], -p[3])):
        for phase, cx, cy, names in clusters:
            if phase == name and 1 / spread < x / cx < spread and 1 / spread < y / cy < spread:
                names.append(SHORT_LABELS[stage])
                break
        else:
            clusters.append((name, x, y, [SHORT_LABELS[stage]]))
    return [(x, y, names) for _phase, x, y, names in clusters]


def _plain_ticks(axis) -> None:
    """Plain numbers (0.5, 2, 40) instead of powers of ten on a log axis."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_roofline(data: dict):
    """Log-log: achieved FLOP/s against arithmetic intensity, under the machine's two ceilings."""
    import numpy as np
    from matplotlib.lines import Line2D

    fig = _new_figure(9, 6)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    points = list(_roofline_points(data))
    xs = [p[2] for p in points] or [1.0]
    ys = [p[3] for p in points] or [1.0]
    machine, dtype = data.get("machine"), data["model"]["dtype"]
    handles = []
    lo, hi = min(xs) / 3, max(xs) * 3
    if machine:
        peak = machine["flops"].get(dtype) or machine["flops"].get("bfloat16") or machine["flops"]["float32"]
        bw = machine["bandwidth"]
        ridge = peak / bw
        lo, hi = min(lo, ridge / 10), max(hi, ridge * 10)
        grid = np.logspace(math.log10(lo), math.log10(hi), 200)
        ax.plot(grid, np.minimum(peak, bw * grid), color="black", linewidth=1.5)
        ax.axvline(ridge, color="grey", linestyle=":", linewidth=1)
        ax.text(lo * 1.2, bw * lo * 1.4, f"memory: {_rate(bw, 'B/s')}", rotation=0, fontsize=8, va="bottom")
        ax.text(hi / 1.2, peak * 1.15, f"{dtype} matmul: {_rate(peak, 'FLOP/s')}", fontsize=8, ha="right",
                va="bottom")
        ax.text(ridge * 1.1, min(ys + [peak]) / 1.5, f"balance\n{ridge:.1f} FLOP/B", fontsize=7, color="grey")
        handles.append(Line2D([], [], color="black", label="machine ceiling (measured)"))
        ax.set_ylim(min(ys + [bw * lo]) / 3, peak * 3)
    ax.set_xlim(lo, hi)
    markers = {"prefill": "o", "decode": "^"}
    for name, stage, x, y in points:
        ax.scatter([x], [y], marker=markers[name], s=60, color=STAGE_COLORS[stage], edgecolors="black",
                   linewidths=0.6, zorder=3)
    for x, y, names in _label_clusters(points):
        right = x > (lo * hi**3) ** 0.25  # in the right quarter of the axis: label to the left of the point
        ax.annotate(", ".join(names), (x, y), xytext=(-6 if right else 6, 4), textcoords="offset points",
                    fontsize=7, ha="right" if right else "left")
    handles += [Line2D([], [], marker=markers[n], linestyle="", color="white", markeredgecolor="black",
                       markersize=8, label=n) for n in PHASES]
    ax.legend(handles=handles, loc="upper left", fontsize=8)  # above the ceilings nothing can be
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved, analytic)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title("Roofline: each stage against the machine's limits")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _stack(ax, xs, points, key: str = "seconds", scale: float = 1e3):
    stages = list(STAGES)
    ys = [[max(p[key][s], 0.0) * scale for p in points] for s in stages]
    ax.stackplot(xs, ys, colors=[STAGE_COLORS[s] for s in stages], labels=[STAGE_LABELS[s] for s in stages])
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    if len(xs) > 1:
        ax.set_xlim(min(xs), max(xs))


def plot_prompt_sweep(sweep: dict):
    points = sweep["prefill"]["points"]
    xs = [p["prompt_len"] for p in points]
    fig = _new_figure(12, 4.5)
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _stack(a, xs, points)
    a.set_xlabel("prompt length (tokens)")
    a.set_ylabel("prefill time (ms)")
    a.set_title("Prefill time by stage (batch 1)")
    a.legend(loc="upper left", fontsize=7, ncol=2)
    b.plot(xs, [p["attention_share"] * 100 for p in points], marker="o", color=STAGE_COLORS["attention"],
           label="attention core, % of time")
    b.plot(xs, [p["attention_flops_share"] * 100 for p in points], marker=".", linestyle="--", color="grey",
           label="attention core, % of FLOPs (analytic)")
    b.set_xscale("log", base=2)
    b.set_xticks(xs, [str(x) for x in xs])
    b.minorticks_off()
    b.set_ylim(0, 100)
    b.set_xlabel("prompt length (tokens)")
    b.set_ylabel("%")
    b.set_title("Attention's share of prefill")
    b.legend(loc="upper left", fontsize=8)
    return fig


def plot_batch_sweep(sweep: dict):
    points = sweep["decode"]["points"]
    xs = [p["batch"] for p in points]
    fig = _new_figure(15, 4.5)
    a, b, c = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 2, 2]})
    _stack(a, xs, points)
    a.set_xlabel("batch (sequences)")
    a.set_ylabel("one decode step (ms)")
    a.set_title(f"Decode step time by stage ({sweep['decode']['context']} tokens cached)")
    a.legend(loc="upper left", fontsize=7, ncol=2)
    b.plot(xs, [p["seconds_per_token"] * 1e3 for p in points], marker="o", color="black", label="ms per token")
    b.set_xscale("log", base=2)
    b.set_ylim(bottom=0)
    b.set_xticks(xs, [str(x) for x in xs])
    b.minorticks_off()
    b.set_xlabel("batch (sequences)")
    b.set_ylabel("ms per generated token (step / batch)")
    b.set_title("Cost per token, and attention's share")
    b2 = b.twinx()
    b2.plot(xs, [p["attention_share"] * 100 for p in points], marker="s", color=STAGE_COLORS["attention"],
            label="attention core, % of step")
    b2.set_ylim(0, 100)
    b2.set_ylabel("attention core, % of step time", color=STAGE_COLORS["attention"])
    b.legend(handles=b.get_lines() + b2.get_lines(), loc="upper right", fontsize=8)
    c.plot(xs, [p["projection_intensity"] for p in points], marker="o", color=STAGE_COLORS["gate_up_proj"],
           label="projections + head")
    c.plot(xs, [p["step_intensity"] for p in points], marker=".", linestyle="--", color="grey", label="whole step")
    balance = sweep.get("machine_balance")
    if balance:
        c.axhline(balance, color="black", linestyle=":", label=f"machine balance {balance:.1f}")
        c.text(xs[0], balance * 1.1, "compute-bound above", ha="left", va="bottom", fontsize=8)
        c.text(xs[0], balance / 1.1, "memory-bound below", ha="left", va="top", fontsize=8)
    c.set_xscale("log", base=2)
    c.set_yscale("log", base=2)
    _plain_ticks(c.yaxis)
    c.set_xticks(xs, [str(x) for x in xs])
    c.minorticks_off()
    c.set_xlabel("batch (sequences)")
    c.set_ylabel("FLOPs per byte (analytic)")
    c.set_title("Arithmetic intensity vs the machine")
    c.legend(loc="lower right", fontsize=8)
    return fig


# -- captions ------------------------------------------------------------------------------------
def _share(x: float) -> str:
    return f"{x:.1%}" if abs(x) < 0.1 else f"{x:.0%}"


def _top(phase: dict, n: int = 2) -> list[tuple[str, float]]:
    ranked = sorted(((s, r["share"]) for s, r in phase["stages"].items()), key=lambda x: -x[1])
    return ranked[:n]


def _caption_bars(data: dict) -> str:
    parts = []
    for name in PHASES:
        (s1, f1), (s2, f2) = _top(data["phases"][name])
        parts.append(f"in {name} {STAGE_LABELS[s1]} ({f1:.0%}) and {STAGE_LABELS[s2]} ({f2:.0%})")
    return (f"Read each bar left to right as a share of that phase's time: the widest blocks are where to "
            f"optimise first, here {parts[0]}, {parts[1]}; grey is time outside every stage.")


def _caption_roofline(data: dict) -> str:
    settings = data["settings"]
    per_step = f"{settings['batch']} token{'s' if settings['batch'] > 1 else ''}"
    why = (f"decode's points sit left of prefill's because each weight read serves {per_step} per step instead of "
           f"{settings['batch'] * settings['prompt_len']:,}")
    if not data.get("machine"):
        return ("Each point is one stage (circle: prefill, triangle: decode), placed by how many FLOPs it does per "
                f"byte it must move and how fast it ran; {why} (measure the machine with leapllm profile --machine "
                "to draw its ceilings).")
    return ("Each point is one stage (circle: prefill, triangle: decode): left of the dotted balance line a stage "
            "can go no faster than memory bandwidth allows (the sloped ceiling), right of it no faster than peak "
            f"matmul (the flat ceiling), so the gap below the ceiling is what a better kernel could win; {why}.")


def _caption_prompt(sweep: dict) -> str:
    pts = sweep["prefill"]["points"]
    first, last = pts[0], pts[-1]
    ratio = last["prompt_len"] / first["prompt_len"]
    return (f"From {first['prompt_len']} to {last['prompt_len']} prompt tokens ({ratio:.0f}x) "
            f"prefill goes from {_ms(first['total_s'])} to {_ms(last['total_s'])} ms "
            f"({last['total_s'] / first['total_s']:.1f}x) and the attention core's share of it from "
            f"{_share(first['attention_share'])} to {_share(last['attention_share'])} (its share of the FLOPs, dashed: "
            f"{_share(first['attention_flops_share'])} to {_share(last['attention_flops_share'])}), because "
            f"attention's work grows with the square of the prompt length and every other stage's linearly.")


def _caption_batch(sweep: dict) -> str:
    pts = sweep["decode"]["points"]
    first, last = pts[0], pts[-1]
    ratio = last["batch"] / first["batch"]
    text = (f"From batch {first['batch']} to {last['batch']} ({ratio:.0f}x the tokens per step) "
            f"a decode step goes from {_ms(first['step_s'])} to {_ms(last['step_s'])} ms "
            f"({last['step_s'] / first['step_s']:.1f}x), so a token costs {_ms(first['seconds_per_token'])} ms at "
            f"batch {first['batch']} and {_ms(last['seconds_per_token'])} ms at batch {last['batch']}")
    balance = sweep.get("machine_balance")
    if not balance:
        return text + ": while a step is bound by reading the weights, more sequences per read are nearly free."
    crossing = next((p["batch"] for p in pts if p["projection_intensity"] >= balance), None)
    if crossing is None:
        return (text + f"; the projections' FLOPs per byte (right) stay below the machine balance of {balance:.0f} "
                "over the whole sweep, so decode stays memory-bound (or bound by launch overhead) and more "
                "sequences per weight read are nearly free.")
    if crossing == first["batch"]:
        return (text + f"; the projections' FLOPs per byte (right) are above the machine balance of {balance:.0f} "
                "over the whole sweep, so arithmetic, not reading the weights, limits these steps.")
    return (text + f"; the projections' FLOPs per byte (right) pass the machine balance of {balance:.0f} at batch "
            f"{crossing}: below it a step is bound by reading the weights and extra sequences are nearly free, "
            "above it arithmetic is the limit and the step time grows with the batch.")


# -- HTML ----------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.facts { color: #555; font-size: 0.95em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.95em; color: #333; margin-top: 0.4em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.total td { font-weight: bold; border-top: 2px solid #999; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; vertical-align: middle; }
.ok { color: #1a7f37; } .bad { color: #b42318; }
"""


def _table_html(header: list[str], rows: list[list[str]], swatches: list[str] | None = None,
                total_last: bool = False) -> str:
    out = ["<table><thead><tr>", "".join(f"<th>{html.escape(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="total"' if total_last and i == len(rows) - 1 else ""
        cells = []
        for j, cell in enumerate(row):
            text = html.escape(cell)
            if j == 0 and swatches and i < len(swatches) and swatches[i]:
                text = f'<span class="swatch" style="background:{swatches[i]}"></span>{text}'
            cells.append(f"<td>{text}</td>")
        out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure_html(fig, alt: str, caption: str) -> str:
    return (f'<figure><img src="data:image/png;base64,{_png_base64(fig)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def figures(data: dict) -> list[tuple[str, object, str]]:
    """(alt text, matplotlib figure, caption) for every plot of the report, in order."""
    out = [
        ("stacked stage bars for prefill and decode", plot_stage_bars(data), _caption_bars(data)),
        ("roofline chart of every stage", plot_roofline(data), _caption_roofline(data)),
    ]
    sweep = data.get("sweep")
    if sweep and sweep["prefill"]["points"]:
        out.append(("prefill stage time against prompt length", plot_prompt_sweep(sweep), _caption_prompt(sweep)))
    if sweep and sweep["decode"]["points"]:
        out.append(("decode stage time against batch size", plot_batch_sweep(sweep), _caption_batch(sweep)))
    return out


def render_html(data: dict) -> str:
    """The whole report as one HTML string: figures inlined as base64 PNGs, no external resources."""
    model, settings = data["model"], data["settings"]
    title = f"leapllm profile: {model['name'] or model['architecture']}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.append(
        f'<p class="facts">{model["layers"]} layers, hidden {model["hidden_size"]}, {model["heads"]} heads '
        f'({model["kv_heads"]} kv), vocabulary {model["vocab_size"]:,}, {model["parameters"] / 1e6:.1f} M parameters; '
        f'{html.escape(model["dtype"])} on {html.escape(model["device"])}, {data["runtime"]["threads"]} threads, '
        f'torch {html.escape(data["runtime"]["torch"])}. Run: batch {settings["batch"]}, prompt '
        f'{settings["prompt_len"]} tokens, {settings["gen_len"]} decode steps, greedy sampling.<br>'
        f'{html.escape(machine_line(data.get("machine"), model["dtype"]))}</p>')
    pre, dec = data["phases"]["prefill"], data["phases"]["decode"]
    body.append(f"<p>{html.escape(_phase_title('prefill', pre, settings))}; "
                f"{html.escape(_phase_title('decode', dec, settings))}.</p>")
    warning = peak_warning(data)
    if warning:
        body.append(f'<p class="bad">{html.escape(warning)}</p>')
    for alt, fig, caption in figures(data):
        body.append(_figure_html(fig, alt, caption))
    swatches = [STAGE_COLORS[s] for s in STAGES]
    for name in PHASES:
        phase = data["phases"][name]
        body.append(f"<h2>{html.escape(_phase_title(name, phase, settings))}</h2>")
        body.append(_table_html(list(COLUMNS), stage_table_rows(phase), swatches, total_last=True))
        cls = "ok" if phase["check"]["ok"] else "bad"
        body.append(f'<p class="{cls}">{html.escape(check_line(name, phase))}</p>')
    body.append("<h2>Per layer</h2><details><summary>ms per stage in each transformer block</summary>")
    for name in PHASES:
        body.append(f"<h3>{name}</h3>")
        header = ["layer"] + [SHORT_LABELS[s] for s in LAYER_STAGES] + ["total"]
        body.append(_table_html(header, per_layer_rows(data["phases"][name])))
    body.append("</details>")
    body.append(
        "<h2>How to read this</h2><ul>"
        "<li><b>Stages</b> are the model's own modules, timed with forward hooks; <b>other</b> is the step's "
        "time outside every stage: Python, reshapes, residual adds, building the next input, and the hooks' "
        "own cost. The stages and other add up to the step time with hooks; the check line compares that with "
        "the same steps run without hooks.</li>"
        "<li><b>GFLOP</b> and <b>MB moved</b> come from a cost model, not counters: a matmul is 2 FLOPs per "
        "multiply-add; bytes are the weights, activations and KV cache a stage must read and write at least once "
        "(leapllm.profiling.costs documents each formula).</li>"
        "<li><b>Bound</b>: a stage whose FLOPs per byte are below the machine balance (peak FLOP/s / bandwidth) "
        "cannot be faster than memory allows; above it, arithmetic is the limit.</li>"
        "<li>Decode figures sum over all decode steps; each step reads every weight once for the whole batch, "
        "which is why a larger batch is almost free until the projections turn compute-bound.</li></ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html(data: dict, path: str | Path) -> None:
    atomic_write(path, render_html(data))
