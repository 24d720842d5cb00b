"""`Seq2SeqLM`: an encoder-decoder (T5, BART, mBART, MarianMT) loaded once; generate, translate, summarize.

    >>> lm = Seq2SeqLM("opus-mt-en-de")
    >>> lm.translate(["The house is wonderful."])[0].text
    >>> Seq2SeqLM("t5-small").translate(["The house is wonderful."], target_lang="de")  # T5's task prefix
    >>> Seq2SeqLM("bart-large-cnn").summarize(long_text)                                # chunked when long

Tasks follow the model's own conventions: T5 reads its `task_specific_params` (the prefix, e.g.
"translate English to German: ", and that task's beam settings, as transformers' pipelines
apply them); mBART takes language codes (en_XX: the source's code in the tokenizer template,
the target's as the decoder's first token); a multilingual Marian model takes ">>xx<<" in front of
the source. Explicit arguments beat the task's settings, which beat the folder's defaults.

Long texts (summarize): the text is cut at sentence ends (., !, ? or a line break followed by
white space) and consecutive sentences are packed, in order, into chunks that fit the encoder's
limit (the position table's length; 512 tokens for T5), prefix and special tokens included; a
sentence longer than the limit alone is cut between words. Each chunk is summarized in one batch
and the summaries are joined with a space.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams
from leapllm.engine.seq2seq import (
    DecoderTokenizer,
    GeneratedIds,
    GenerationPlan,
    Seq2SeqParams,
    engine_request,
    plan_generation,
    seq2seq_params_from_sampling,
    source_params,
)
from leapllm.errors import InvalidRequestError
from leapllm.loading.seq2seq_loader import load_seq2seq
from leapllm.model.attention import AttentionMaps

MAX_ATTENTION_TOKENS = 512  # a side; as LLM.attention's limit
T5_SOURCE_LIMIT = 512  # T5's positions are relative, but it was trained on 512-token inputs
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish",
                  "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese",
                  "ja": "Japanese"}
_TASK_SETTINGS = ("num_beams", "max_length", "min_length", "length_penalty", "early_stopping",
                  "no_repeat_ngram_size", "decoder_start_token_id", "forced_bos_token_id")


@dataclass
class Seq2SeqOutput:
    source: str
    text: str
    token_ids: list[int]  # generated: no decoder start token, the EOS if it ended on one
    source_token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    score: float | None = None  # beam search: the length-penalized log-probability
    timings: dict[str, float] = field(default_factory=dict)  # of the whole batch it was generated in


class Seq2SeqLM:
    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", num_threads: int | None = None, quantize: str | None = None,
                 engine_config: EngineConfig | None = None):
        """quantize="int8": int8 decoder weights on leapllm's CPU kernels (load_seq2seq).
        engine_config: the batching engine's settings (every search runs on it)."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        loaded = load_seq2seq(model, dtype=dtype, device=device, quantize=quantize)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.defaults = loaded.generation
        self.path = loaded.path
        self.model_type = loaded.model_type
        self.load_seconds = loaded.load_seconds
        self.config_raw = loaded.config_raw
        # Keys and values in float32 unless asked otherwise: the same arithmetic as transformers'
        # generate() (the decoder LLMs' "auto" stores float16 on the CPU).
        engine_config = engine_config or EngineConfig()
        if engine_config.kv_cache_dtype == "auto":
            engine_config = replace(engine_config, kv_cache_dtype="float32")
        self.engine_config = engine_config
        self._engine: LLMEngine | None = None
        self._request_ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        """The batching engine that greedy decoding, sampling and beam search run on (built at first use)."""
        if self._engine is None:
            tokenizer = DecoderTokenizer(self.tokenizer, self.defaults.eos_token_ids)
            self._engine = LLMEngine(self.model, tokenizer, self.engine_config)
        return self._engine

    @property
    def family(self) -> str:
        return self.model.config.family

    @property
    def source_limit(self) -> int:
        """The most tokens a source may have, special tokens included."""
        return self.model.config.max_source_tokens or T5_SOURCE_LIMIT

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"a source must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def generate(self, texts: str | list[str], params: Seq2SeqParams | SamplingParams | None = None, *,
                 prefix: str = "", **overrides) -> list[Seq2SeqOutput]:
        """One output per source text, generated together in one batch. `overrides` are
        Seq2SeqParams fields (max_new_tokens=..., num_beams=...) over `params`. A decoder LLM's
        SamplingParams work too (seq2seq_params_from_sampling), so that code written for `LLM`
        runs an encoder-decoder that `LLM(folder)` handed it."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise InvalidRequestError("give at least one source text")
        if isinstance(params, SamplingParams):
            params = seq2seq_params_from_sampling(params)
        params = _with_overrides(params or Seq2SeqParams(), overrides)
        sources = [self.encode(prefix + t) for t in texts]
        plan = plan_generation(params, self.defaults, self.model)
        out = self.run_on_engine(sources, plan)
        return [Seq2SeqOutput(text, self.tokenizer.decode(ids), ids, src, reason, score, dict(out.timings))
                for text, ids, src, reason, score in zip(texts, out.token_ids, sources, out.finish_reasons,
                                                         out.scores, strict=True)]

    def run_on_engine(self, sources: list[list[int]], plan: GenerationPlan) -> GeneratedIds:
        """These tokenized sources as the engine's requests, stepped until all end (each seeded
        request draws from its own stream, as the server's would)."""
        engine = self.engine
        request = engine_request(plan)
        for ids in sources:  # all checked before any is queued
            engine.check_request(request.prompt_ids, request.params, encoder_ids=ids, beam_search=request.beam_search)
        request_ids = [f"seq2seq-{next(self._request_ids)}" for _ in sources]
        extra = {"logits_processor": request.logits_processor, "beam_search": request.beam_search}
        start = time.perf_counter()
        done = engine.run_requests([(rid, request.prompt_ids, source_params(request, i), {"encoder_ids": ids, **extra})
                                    for i, (rid, ids) in enumerate(zip(request_ids, sources, strict=True))])
        seconds = time.perf_counter() - start
        token_ids = [[t for out in done[rid] for t in out.new_token_ids] for rid in request_ids]
        generated = sum(len(t) for t in token_ids)
        timings = {"total_s": seconds, "source_tokens": float(sum(len(ids) for ids in sources)),
                   "generated_tokens": float(generated), "tokens_per_s": generated / seconds if seconds > 0 else 0.0}
        return GeneratedIds(token_ids, [done[rid][-1].finish_reason for rid in request_ids],
                            [done[rid][-1].score for rid in request_ids], timings)

    def attention(self, source: str, target: str | None = None) -> list[AttentionMaps]:
        """Every layer's and head's attention over a source and a target: the encoder's, the
        decoder's and the cross-attention (target tokens looking at source tokens). Without a target,
        the model's own greedy output is the target. The decoder reads its start token, then the
        target's tokens (queries and keys are named by them)."""
        source_ids = self.encode(source)
        if target is None:
            target_ids = self.generate(source, num_beams=1)[0].token_ids
        else:
            target_ids = self.tokenizer.encode(target)
        plan = plan_generation(Seq2SeqParams(), self.defaults, self.model)
        decoder_ids = [plan.decoder_start_token_id, *target_ids]
        if len(source_ids) > MAX_ATTENTION_TOKENS or len(decoder_ids) > MAX_ATTENTION_TOKENS:
            raise InvalidRequestError(f"attention maps take at most {MAX_ATTENTION_TOKENS} tokens a side")
        device = self.model.device
        maps = self.model.attention_maps(torch.tensor([source_ids], device=device),
                                         torch.tensor([decoder_ids], device=device))
        # SentencePiece marks a word's start with U+2581; the page shows it as the space it stands for.
        src = [(self.tokenizer.id_to_token(t) or "").replace("\u2581", " ") for t in source_ids]
        tgt = [(self.tokenizer.id_to_token(t) or "").replace("\u2581", " ") for t in decoder_ids]
        return [AttentionMaps("encoder", src, src, [m[0] for m in maps["encoder"]]),
                AttentionMaps("decoder", tgt, tgt, [m[0] for m in maps["decoder"]]),
                AttentionMaps("cross", tgt, src, [m[0] for m in maps["cross"]])]

    # -- tasks ---------------------------------------------------------------------------------

    def _task_params(self, task: str, params: Seq2SeqParams, overrides: dict) -> tuple[Seq2SeqParams, str]:
        """The task's prefix, and params with its settings where neither params nor overrides set one."""
        settings = self.defaults.task_specific_params.get(task, {})
        given = {f.name for f in fields(Seq2SeqParams) if getattr(params, f.name) != getattr(Seq2SeqParams(), f.name)}
        given |= set(overrides)
        if "max_new_tokens" in given:
            given.add("max_length")  # an explicit new-token budget replaces the task's max_length
        task_values = {k: settings[k] for k in _TASK_SETTINGS if k in settings and k not in given}
        return _with_overrides(replace(params, **task_values), overrides), str(settings.get("prefix", ""))

    def translate(self, texts: str | list[str], params: Seq2SeqParams | None = None, *,
                  source_lang: str | None = None, target_lang: str | None = None, **overrides) -> list[Seq2SeqOutput]:
        """Translate with the model's own language conventions (see the module docstring)."""
        if isinstance(texts, str):
            texts = [texts]
        params = params or Seq2SeqParams()
        prefix = ""
        if self.family == "t5":
            task = self._translation_task(source_lang, target_lang)
            params, prefix = self._task_params(task, params, overrides)
            overrides = {}
        elif self.family == "mbart":
            if source_lang is not None:
                self.tokenizer.set_source_language(self._mbart_code(source_lang))
            if target_lang is not None:
                code_id = self.tokenizer.token_to_id(self._mbart_code(target_lang))
                # mBART-50 starts from </s> and forces the code as the first token; mBART-25 starts from it.
                if self.defaults.decoder_start_token_id in self.defaults.eos_token_ids:
                    params = replace(params, forced_bos_token_id=code_id)
                else:
                    params = replace(params, decoder_start_token_id=code_id)
        elif self.family == "marian":
            prefix = self._marian_prefix(source_lang, target_lang)
        elif source_lang is not None or target_lang is not None:
            raise InvalidRequestError(f"a {self.model_type} model has no language settings; drop the languages")
        return self.generate(texts, params, prefix=prefix, **overrides)

    def _translation_task(self, source_lang: str | None, target_lang: str | None) -> str:
        tasks = sorted(k for k in self.defaults.task_specific_params if k.startswith("translation_"))
        pairs = [k.removeprefix("translation_").split("_to_") for k in tasks]
        if not tasks:
            raise InvalidRequestError(f"{self.path}: this T5 model lists no translation task "
                                      "(task_specific_params); use generate with your own prefix")
        source = _language_code(source_lang) if source_lang else None
        target = _language_code(target_lang) if target_lang else None
        matching = [f"translation_{s}_to_{t}" for s, t in pairs
                    if (source is None or s == source) and (target is None or t == target)]
        if len(matching) != 1:
            known = ", ".join(f"{s}->{t}" for s, t in pairs)
            what = "no" if not matching else "more than one"
            raise InvalidRequestError(f"{what} translation task of this model matches; it knows {known} "
                                      "(give --source-lang and --target-lang)")
        return matching[0]

    def _mbart_code(self, lang: str) -> str:
        codes = getattr(self.tokenizer, "language_codes", [])
        if lang in codes:
            return lang
        found = [c for c in codes if c.split("_")[0] == _language_code(lang)]
        if len(found) != 1:
            raise InvalidRequestError(f"unknown language {lang!r} for this mBART model; codes: {', '.join(codes)}")
        return found[0]

    def _marian_prefix(self, source_lang: str | None, target_lang: str | None) -> str:
        tokenizer_config = self.path / "tokenizer_config.json"
        fixed = {}
        if tokenizer_config.is_file():
            import json

            try:
                fixed = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                fixed = {}
        for name, lang in (("source_lang", source_lang), ("target_lang", target_lang)):
            if lang is not None and fixed.get(name) and _language_code(lang) != _language_code(str(fixed[name])):
                code = f">>{_language_code(lang)}<<"
                if name == "target_lang" and self.tokenizer.token_to_id(code) is not None:
                    continue  # a multilingual target: the code goes in front of the text
                raise InvalidRequestError(f"this Marian model translates {fixed.get('source_lang', '?')} to "
                                          f"{fixed.get('target_lang', '?')}; it cannot do {name} {lang}")
        if target_lang is not None:
            code = f">>{_language_code(target_lang)}<<"
            if self.tokenizer.token_to_id(code) is not None:
                return code + " "
        return ""

    def summarize(self, texts: str | list[str], params: Seq2SeqParams | None = None, *, chunk: bool = True,
                  **overrides) -> list[Seq2SeqOutput]:
        """Summaries, with T5's "summarize: " prefix and the model's summarization settings; a text
        longer than the encoder takes is summarized chunk by chunk (module docstring)."""
        if isinstance(texts, str):
            texts = [texts]
        params, prefix = self._task_params("summarization", params or Seq2SeqParams(), overrides)
        outputs = []
        for text in texts:
            chunks = self.chunks(text, prefix) if chunk else [text]
            parts = self.generate(chunks, params, prefix=prefix)
            if len(parts) == 1:
                outputs.append(replace(parts[0], source=text))
                continue
            outputs.append(Seq2SeqOutput(
                text, " ".join(p.text.strip() for p in parts), [t for p in parts for t in p.token_ids],
                [t for p in parts for t in p.source_token_ids],
                "length" if any(p.finish_reason == "length" for p in parts) else "stop",
                None, dict(parts[0].timings)))
        return outputs

    def chunks(self, text: str, prefix: str = "") -> list[str]:
        """`text` cut into pieces whose tokens (with prefix and special tokens) fit the encoder."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError("there is no text to summarize (the input is empty)")
        limit = self.source_limit

        def fits(piece: str) -> bool:
            return len(self.encode(prefix + piece)) <= limit

        if fits(text.strip()):
            return [text.strip()]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n\s*", text) if s.strip()]
        pieces: list[str] = []
        for sentence in sentences:
            if fits(sentence):
                pieces.append(sentence.strip())
                continue
            words, current = sentence.split(), ""
            for word in words:  # a sentence too long alone: cut between words
                candidate = f"{current} {word}".strip()
                if current and not fits(candidate):
                    pieces.append(current)
                    candidate = word
                if not fits(candidate):
                    raise InvalidRequestError(f"a single word of the text is longer than the {limit}-token "
                                              "limit of this model")
                current = candidate
            if current:
                pieces.append(current)
        chunks: list[str] = []
        for piece in pieces:
            if chunks and fits(chunks[-1] + " " + piece):
                chunks[-1] = chunks[-1] + " " + piece
            else:
                chunks.append(piece)
        return chunks


def _with_overrides(params: Seq2SeqParams, overrides: dict) -> Seq2SeqParams:
    names = {f.name for f in fields(Seq2SeqParams)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidRequestError(f"unknown generation setting {unknown[0]!r}")
    return replace(params, **overrides) if overrides else params


def _language_code(lang: str) -> str:
    """"de", "German" or "de_DE" -> "de"."""
    lang = lang.strip()
    for code, name in LANGUAGE_NAMES.items():
        if lang.lower() == name.lower():
            return code
    return lang.split("_")[0].lower()

