"""The Python API: `LLM` loads a model once and generates, streams and chats with it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leapllm.config import EngineConfig, SpeculativeConfig
from leapllm.engine.llm_engine import LLMEngine, single_sequence_config
from leapllm.engine.request import RequestOutput
from leapllm.engine.sampling import SamplingParams
from leapllm.engine.speculative import check_draft_model
from leapllm.engine.structured_output import StructuredOutputParams
from leapllm.errors import InvalidRequestError
from leapllm.kernels.packing import many_rows_kernel
from leapllm.loading.loader import load_model
from leapllm.loading.seq2seq_loader import is_seq2seq_folder
from leapllm.model.attention import AttentionMaps
from leapllm.model.quantized.layers import packed_linear_of
from leapllm.model.quantized.layers import parameter_count as model_parameter_count

Prompt = str | list[int]

# Attention maps hold layers x heads x n x n float32 probabilities: 512 tokens of a 30-layer,
# 9-head model are 280 MB, and a page of them is still readable.
MAX_ATTENTION_TOKENS = 512


@dataclass
class GenerationOutput:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    timings: dict[str, float] = field(default_factory=dict)
    parsed: Any = None  # for `chat(..., response_format=...)`: the reply as that model (or as JSON)


def generation_timings(start: float, first: float, end: float, prompt_tokens: int, output_tokens: int) -> dict:
    """GenerationOutput.timings from the clock at the start, at the first token and at the end."""
    decode_tokens = output_tokens - 1  # the first token comes out of the prefill
    return {
        "time_to_first_token_s": first - start,
        "total_s": end - start,
        "prefill_tokens_per_s": prompt_tokens / (first - start) if first > start else 0.0,
        "decode_tokens_per_s": decode_tokens / (end - first) if decode_tokens > 0 and end > first else 0.0,
    }


class LLM:
    """A loaded model and tokenizer.

    >>> llm = LLM()                                  # SmolLM2-135M-Instruct, float32 on CPU
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))[0].text
    """

    def __new__(cls, model: str | Path | None = None, *, dtype: str | torch.dtype = "auto",
                device: str | torch.device = "auto", num_threads: int | None = None,
                engine_config: EngineConfig | None = None, tensor_parallel: int = 1,
                speculative: str | None = None, draft_model: str | Path | None = None,
                num_speculative_tokens: int = 4):
        # An encoder-decoder folder gets its own engine: LLM(folder) hands back a Seq2SeqLM, whose
        # generate takes the same prompts and SamplingParams (engine/seq2seq_lm.py).
        if model is not None and is_seq2seq_folder(model):
            from leapllm.engine.seq2seq_lm import Seq2SeqLM

            if engine_config is not None or tensor_parallel != 1 or speculative is not None or draft_model is not None:
                raise InvalidRequestError("an encoder-decoder model runs on its own engine, in one process: "
                                          "engine_config, tensor_parallel and speculative decoding do not apply")
            return Seq2SeqLM(model, dtype=dtype, device=device, num_threads=num_threads)
        return super().__new__(cls)

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "auto", num_threads: int | None = None,
                 engine_config: EngineConfig | None = None, tensor_parallel: int = 1,
                 speculative: str | None = None, draft_model: str | Path | None = None,
                 num_speculative_tokens: int = 4):
        """tensor_parallel=N splits the model over N processes (this one is rank 0; it starts the
        others, or joins them under torchrun): see leapllm.distributed and docs/scale-out.md.

        speculative="ngram" (prompt lookup) or draft_model=PATH (a smaller model with the same
        tokenizer, loaded with the same dtype and device) turn on speculative decoding with up to
        num_speculative_tokens proposals a step, in `run`/`stream`/`chat` and in the engine behind
        `generate`: the output stays what the model alone gives (engine/speculative.py)."""
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise InvalidRequestError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if tensor_parallel == 1:
            loaded = load_model(model, dtype=dtype, device=device)
            self.model = loaded.model
        else:
            from leapllm.distributed import RankSettings, load_tensor_parallel

            settings = RankSettings(None if model is None else str(model), str(dtype).removeprefix("torch."),
                                    str(device), num_threads)
            loaded, self.model = load_tensor_parallel(settings, tensor_parallel)
        self.tensor_parallel = tensor_parallel
        self.tokenizer = loaded.tokenizer
        self.path = loaded.path
        self.metadata = loaded.metadata
        self.load_seconds = loaded.load_seconds
        self.engine_config = engine_config or EngineConfig()
        self.speculative = self._speculative_config(speculative, draft_model, num_speculative_tokens, dtype, device)
        if self.speculative is not None and self.engine_config.speculative is None:
            self.engine_config.speculative = self.speculative
        self._engine: LLMEngine | None = None  # the batching engine, built on first use (it owns the KV pool)
        self._single: LLMEngine | None = None  # the same engine, one request at a time, for run/stream/chat
        self._request_ids = itertools.count()

    def _speculative_config(self, method, draft_model, k, dtype, device) -> SpeculativeConfig | None:
        if method is None and draft_model is None:
            return None
        method = method or "draft"
        if method == "ngram" and draft_model is not None:
            raise InvalidRequestError("n-gram speculation takes no draft model; give one or the other")
        if self.tensor_parallel > 1:
            raise InvalidRequestError("speculative decoding is not supported with tensor parallelism")
        draft = None
        if method == "draft":
            if draft_model is None:
                raise InvalidRequestError("speculative decoding with a draft model needs a draft model path")
            loaded = load_model(draft_model, dtype=dtype, device=device)
            check_draft_model(self.model, self.tokenizer, loaded.model, loaded.tokenizer)
            draft = loaded.model
        config = SpeculativeConfig(method=method, num_speculative_tokens=k, draft_model=draft)
        config.validate()
        return config

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            self._engine = LLMEngine(self.model, self.tokenizer, self.engine_config)
        return self._engine

    @property
    def single_sequence_engine(self) -> LLMEngine:
        """The engine behind run, stream and chat: one request at a time on a contiguous cache."""
        if self._single is None:
            config = single_sequence_config(self.model.config.context_length, self.speculative,
                                            kv_cache_dtype=self.engine_config.kv_cache_dtype,
                                            enforce_eager=self.engine_config.enforce_eager)
            self._single = LLMEngine(self.model, self.tokenizer, config)
        return self._single

    @property
    def speculation_stats(self) -> dict[str, float]:
        """What speculation did in run, stream and chat so far: tokens proposed and accepted,
        verification and plain steps, and the seconds spent proposing, verifying and in plain steps;
        empty until something was proposed."""
        engine = self._single
        if engine is None or not engine.num_spec_proposed:
            return {}
        return {"proposed": engine.num_spec_proposed, "accepted": engine.num_spec_accepted,
                "speculative_steps": engine.num_spec_steps, "plain_steps": engine.num_plain_steps,
                **engine.spec_seconds}

    @property
    def config(self):
        return self.model.config

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (also done at exit); nothing to do with one process."""
        group = getattr(self.model, "group", None)
        if group is not None:
            group.close()

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidRequestError("a prompt must be a string or a list of token ids")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    # -- generation ----------------------------------------------------------------------------
    def stream_outputs(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """The request's deltas as the single-sequence engine produces them; the last is `finished`."""
        request_id = f"run-{next(self._request_ids)}"
        return self.single_sequence_engine.stream(request_id, prompt_ids, params or SamplingParams())

    def run(self, prompt_ids: list[int], params: SamplingParams | None = None, *, prompt: str | None = None,
            on_text: Callable[[str], Any] | None = None) -> GenerationOutput:
        """Generate for one tokenized prompt, calling on_text with each new piece of text as it comes."""
        start = time.perf_counter()
        pieces, token_ids = [], []
        out = None
        for out in self.stream_outputs(prompt_ids, params):
            pieces.append(out.new_text)
            token_ids.extend(out.new_token_ids)
            if on_text is not None and out.new_text:
                on_text(out.new_text)
        end = time.perf_counter()
        timings = generation_timings(start, out.first_token_time or end, end, len(out.prompt_token_ids),
                                     len(token_ids))
        return GenerationOutput(
            prompt=prompt if prompt is not None else self.tokenizer.decode(out.prompt_token_ids),
            text="".join(pieces), token_ids=token_ids, prompt_token_ids=out.prompt_token_ids,
            finish_reason=out.finish_reason, stop_reason=out.stop_reason, timings=timings,
        )

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None) -> list[GenerationOutput]:
        """Complete each prompt (a string or token ids); one output per prompt, in order.

        All prompts run together through the continuous-batching engine (paged KV cache, chunked
        prefill, prefix caching); `run` and `stream` run one request at a time on the same engine
        code, on a contiguous cache (engine/model_runner.py).
        """
        params = params or SamplingParams()
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        engine = self.engine
        # Encode and check every prompt before generating anything.
        encoded = [engine.check_request(self.encode(p), params) for p in prompts]
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        start = time.perf_counter()
        done = engine.run_requests([(request_id, prompt_ids, params, {})
                                    for request_id, prompt_ids in zip(ids, encoded)])
        end = time.perf_counter()
        results = []
        for p, request_id, prompt_ids in zip(prompts, ids, encoded):
            outs = done[request_id]
            last = outs[-1]
            token_ids = [t for o in outs for t in o.new_token_ids]
            timings = generation_timings(start, last.first_token_time or end, end, len(prompt_ids), len(token_ids))
            results.append(GenerationOutput(
                prompt=p if isinstance(p, str) else self.tokenizer.decode(prompt_ids),
                text="".join(o.new_text for o in outs), token_ids=token_ids, prompt_token_ids=prompt_ids,
                finish_reason=last.finish_reason, stop_reason=last.stop_reason, timings=timings))
        return results

    def stream_text(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """The completion's text piece by piece as it is generated (no empty pieces)."""
        return (out.new_text for out in self.stream_outputs(prompt_ids, params) if out.new_text)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text piece by piece as it is generated."""
        yield from self.stream_text(self.encode(prompt), params)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
             response_format: type | dict[str, Any] | None = None) -> GenerationOutput:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) using the model's chat template.

        response_format: a pydantic model class or a JSON schema; the reply is then held to that
        schema, and `parsed` holds it as an instance of the model (or as parsed JSON). A reply cut
        short by max_tokens has `parsed` None and finish_reason "length"."""
        params = params or SamplingParams()
        model_class = None
        if response_format is not None:
            if isinstance(response_format, dict):
                schema = response_format
            elif isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
                model_class, schema = response_format, response_format.model_json_schema()
            else:
                raise InvalidRequestError("response_format must be a pydantic model class or a JSON schema dict")
            params = dataclasses.replace(params, structured_output=StructuredOutputParams(json=schema))
        out = self.run(self.encode_chat(messages), params)
        if response_format is not None and out.finish_reason == "stop":
            out.parsed = model_class.model_validate_json(out.text) if model_class else json.loads(out.text)
        return out

    def stream_chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Iterator[str]:
        yield from self.stream_text(self.encode_chat(messages), params)

    # -- understanding -------------------------------------------------------------------------
    def attention(self, prompt: Prompt) -> list[AttentionMaps]:
        """Every layer's and head's attention probabilities over the prompt, as the model computes
        them in a forward pass: [AttentionMaps("self", tokens, tokens, layers)], each layer
        (heads, tokens, tokens). The generation paths are untouched (Transformer.attention_maps)."""
        if self.tensor_parallel > 1:
            raise InvalidRequestError("attention maps need the whole model in one process (tensor_parallel=1)")
        ids = self.encode(prompt)
        if not ids:
            raise InvalidRequestError("the prompt has no tokens")
        if len(ids) > MAX_ATTENTION_TOKENS:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; attention maps take at most "
                                      f"{MAX_ATTENTION_TOKENS}")
        layers = self.model.attention_maps(torch.tensor([ids], device=self.model.device))
        tokens = [self.tokenizer.decode([t]) for t in ids]
        return [AttentionMaps("self", tokens, tokens, [layer[0].cpu() for layer in layers])]

    def info(self) -> dict[str, Any]:
        """Facts about the loaded model: shape, parameter count, bytes by dtype on disk and in memory,
        and what runs each stored tensor type (leapllm's kernels, or dequantized floats)."""
        c = self.config
        tensors = {t.data_ptr(): t for t in [*self.model.parameters(), *self.model.buffers()]}  # shared ones once
        in_memory: dict[str, int] = {}
        for t in tensors.values():
            key = str(t.dtype).removeprefix("torch.")
            in_memory[key] = in_memory.get(key, 0) + t.numel() * t.element_size()
        return {
            "path": str(self.path),
            "name": c.name,
            "architecture": c.architecture,
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "heads": c.num_heads,
            "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "context_length": c.context_length,
            "rope_theta": c.rope_theta,
            "tied_embeddings": c.tie_word_embeddings,
            "family": c.family_switches(),
            "parameters": model_parameter_count(self.model),
            "stored_dtypes": c.extra.get("stored_dtypes", {}),
            "kernels_by_type": c.extra.get("kernels_by_type", {}),
            # what a prefill's many rows run on, where some tensor runs on leapllm's kernels
            "many_rows_kernel": many_rows_kernel() if any(packed_linear_of(m) for m in self.model.modules()) else None,
            "memory_bytes_by_dtype": in_memory,
            "device": str(self.model.device),
            "chat_template": self.tokenizer.chat_template is not None,
        }
