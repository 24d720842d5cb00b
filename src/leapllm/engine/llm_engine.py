"""The serving engine: requests in, one batched forward pass per step, token deltas out.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=32))
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...

The scheduler decides who runs; the paged KV cache holds every sequence's keys and values;
this file turns a scheduled step into one flattened forward pass, samples, detokenizes, checks
stop conditions and returns finished sequences' blocks. It is synchronous and single-threaded:
async_engine.py runs it in a background thread for the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from leapllm.engine.block_allocator import BlockAllocator
from leapllm.engine.generate import _drain, fit_prompt
from leapllm.engine.sampling import SamplingParams, greedy_tokens
from leapllm.engine.scheduler import ScheduledStep, Scheduler
from leapllm.engine.sequence import RequestOutput, Sequence, SequenceStatus, TokenLogprob
from leapllm.engine.speculative import (NgramProposer, SpeculationController, SpeculativeConfig, draft_sampler,
                                        draw_proposal, verify_proposals)
from leapllm.errors import InvalidRequestError
from leapllm.model.llama import Transformer
from leapllm.model.paged_kv_cache import KV_DTYPES, PagedKVCache, build_paged_batch
from leapllm.tokenization import Tokenizer

MAX_LOGPROBS = 20


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step (decode tokens + prefill chunks)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_gb: float = 1.0  # size of the KV pool
    num_blocks: int | None = None  # overrides kv_cache_gb (tests use small pools)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "int8" (~3.8x the tokens per GB in float32)
    speculative: SpeculativeConfig | None = None  # speculative decoding of small batches (engine/speculative.py)

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidRequestError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs})")
        if self.block_size < 1:
            raise InvalidRequestError(f"block_size must be at least 1, got {self.block_size}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.num_blocks is None and not self.kv_cache_gb > 0:
            raise InvalidRequestError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.speculative is not None:
            self.speculative.validate()


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        config.validate()
        c = model.config
        # A tensor-parallel rank (distributed/runtime.py) caches only the kv heads of its own shard.
        num_kv_heads = getattr(model, "num_kv_heads_per_rank", c.num_kv_heads)
        per_block = PagedKVCache.bytes_per_block(c.num_layers, config.block_size, num_kv_heads, c.head_dim,
                                                 model.dtype, config.kv_cache_dtype)
        num_blocks = config.num_blocks or int(config.kv_cache_gb * 2**30 // per_block)
        if num_blocks < 1:
            raise InvalidRequestError(f"a KV cache of {config.kv_cache_gb} GB holds no block of "
                                      f"{per_block / 2**20:.2f} MiB")
        self.cache = PagedKVCache(c.num_layers, num_blocks, config.block_size, num_kv_heads, c.head_dim,
                                  model.dtype, model.device, config.kv_cache_dtype)
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens)
        self.sequences: dict[str, Sequence] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.speculative = config.speculative
        self.draft_cache: PagedKVCache | None = None
        if self.speculative is not None and self.speculative.method == "draft":
            # The draft's keys and values live in a pool of its own shape, indexed by the same block
            # tables as the target's: a sequence's blocks hold both models' entries for its positions.
            d = self.speculative.draft_model
            self.draft_cache = PagedKVCache(d.config.num_layers, num_blocks, config.block_size, d.config.num_kv_heads,
                                            d.config.head_dim, d.dtype, d.device)
        self.num_spec_proposed = self.num_spec_accepted = self.num_spec_steps = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    logprobs: int | None = None, prompt_logprobs: int | None = None) -> None:
        """Queue a request; raises InvalidRequestError if it can never run (too long, bad ids, ...)."""
        if request_id in self.sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.check_request(prompt_ids, params, logprobs, prompt_logprobs)
        c = self.model.config
        seq = Sequence(request_id, prompt_ids, params, self.tokenizer, c.vocab_size, self.model.device,
                       logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        spec = self.speculative
        if spec is not None:
            seq.controller = SpeculationController(spec.num_speculative_tokens, spec.adaptive,
                                                    catches_up=spec.method == "draft")
            if spec.method == "ngram":
                seq.ngram = NgramProposer(spec.ngram_max, spec.ngram_min)
            else:
                seq.draft_sampler = draft_sampler(params, seq.sampler, spec.draft_model)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(prompt_ids)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None,
                      prompt_logprobs: int | None = None) -> list[int]:
        """The prompt ids the request will run with (truncated if it asked); raises InvalidRequestError
        if it can never run. Reads only fixed settings, so any thread may call it."""
        c = self.model.config
        prompt_ids = fit_prompt(list(prompt_ids), params, c.context_length)
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < c.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{c.vocab_size - 1})")
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        need = self.allocator.blocks_needed(len(prompt_ids) + params.max_tokens)
        if need > self.allocator.num_blocks:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV-cache blocks; "
                f"the pool has {self.allocator.num_blocks} (raise --kv-cache-gb)")
        return prompt_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (finish_reason "abort"), or None if unknown."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.free(seq)
        seq.status = SequenceStatus.FINISHED
        return self._output(seq, [], "", None, finish=("abort", None))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batched forward pass; return a delta for every request that produced a token or finished."""
        started = time.perf_counter()
        step = self.scheduler.schedule()
        if step.empty:
            return []
        for seq in step.preempted:
            seq.draft_computed = 0
        proposals = self._propose(step) if self.speculative is not None else {}
        if proposals:  # verified as chunks of [last token, proposals...], after the plain decodes
            step.decodes = [seq for seq in step.decodes if id(seq) not in proposals]
        step.decodes.sort(key=lambda seq: seq.num_computed, reverse=True)  # attention groups by length
        logits, rows = self._forward(step, proposals)
        outputs = self._process(step, logits, rows)
        if proposals:
            outputs += self._process_speculative(proposals, logits, rows)
        if self.speculative is not None:
            self._record_step_time(step, proposals, time.perf_counter() - started)
        return outputs

    # -- speculative decoding ------------------------------------------------------------------
    def _propose(self, step: ScheduledStep) -> dict[int, tuple]:
        """id(seq) -> (seq, proposals, draft distributions or None) for the decodes that speculate now."""
        spec = self.speculative
        if not step.decodes or len(step.decodes) > spec.max_batch_size:
            return {}
        spare = self.config.max_num_batched_tokens - step.num_tokens
        bs = self.config.block_size
        wanted: list[tuple[Sequence, int]] = []
        for seq in step.decodes:
            if seq.logprobs is not None or seq.controller is None:
                continue  # per-token logprobs are reported from single-token steps only
            k = min(seq.controller.num_tokens(), spare, seq.params.max_tokens - len(seq.output_ids) - 1)
            if k <= 0:
                continue
            # Room for k more positions: grow into free blocks, never preempting anyone for it.
            if not self.scheduler.reserve(seq, seq.num_computed + 1 + k):
                k = min(k, len(seq.blocks) * bs - seq.num_computed - 1)
            if k > 0:
                wanted.append((seq, k))
                spare -= k
        if not wanted:
            return {}
        if spec.method == "ngram":
            out = {}
            for seq, k in wanted:
                tokens = seq.ngram.propose(seq.all_ids, k)
                if tokens:
                    out[id(seq)] = (seq, tokens, None)
            return out
        return self._propose_with_draft(wanted)

    def _propose_with_draft(self, wanted: list[tuple[Sequence, int]]) -> dict[int, tuple]:
        """k_i proposals for each sequence from the draft model: one pass that catches the draft up
        on everything it has not seen (a whole prompt the first time), then one batched pass per
        further proposal."""
        draft, device, bs = self.speculative.draft_model, self.model.device, self.config.block_size
        tokens = {id(seq): [] for seq, _ in wanted}
        probs = {id(seq): [] for seq, _ in wanted}
        for j in range(max(k for _, k in wanted)):
            active = [(seq, k) for seq, k in wanted if k > j]
            ids, chunks, last_rows = [], [], []
            for seq, _ in active:
                if j == 0:
                    new = seq.all_ids[seq.draft_computed:]
                    first = seq.draft_computed
                else:
                    new = tokens[id(seq)][-1:]
                    first = seq.num_tokens + j - 1
                ids.extend(new)
                chunks.append((seq.blocks, first, len(new)))
                last_rows.append(len(ids) - 1)
            self.draft_cache.batch = build_paged_batch([], chunks, bs, device)
            logits = draft.forward_paged(torch.tensor(ids, device=device), self.draft_cache,
                                         torch.tensor(last_rows, dtype=torch.long, device=device))
            self.draft_cache.batch = None
            for r, (seq, _) in enumerate(active):
                t, q = draw_proposal(seq.draft_sampler, logits[r])
                tokens[id(seq)].append(t)
                if q is not None:
                    probs[id(seq)].append(q)
        out = {}
        for seq, k in wanted:
            seq.draft_computed = seq.num_tokens  # the context; its proposals' entries count once kept
            out[id(seq)] = (seq, tokens[id(seq)], torch.stack(probs[id(seq)]) if probs[id(seq)] else None)
        return out

    def _process_speculative(self, proposals: dict[int, tuple], logits: torch.Tensor, rows) -> list[RequestOutput]:
        outputs = []
        now = time.perf_counter()
        for key, (seq, tokens, draft_probs) in proposals.items():
            first, count = rows[key]
            emitted = verify_proposals(seq.sampler, logits[first:first + count], tokens, draft_probs)
            kept = len(emitted) - 1
            seq.num_computed += 1 + kept  # the last token and the kept proposals are in the cache now
            if self.draft_cache is not None:
                seq.draft_computed += min(kept, len(tokens) - 1)
            seq.spec_step = (len(tokens), kept)
            self.num_spec_proposed += len(tokens)
            self.num_spec_accepted += kept
            self.num_spec_steps += 1
            deltas = []
            for token in emitted:
                out = self._append_token(seq, token, None, now, record=False)
                if out is not None:
                    deltas.append(out)
                if out is not None and out.finished:
                    break
            if seq.status is not SequenceStatus.FINISHED:
                self._register_filled_blocks(seq)
            if deltas:
                outputs.append(merge_outputs(deltas))
        return outputs

    def _record_step_time(self, step: ScheduledStep, proposals: dict, seconds: float) -> None:
        """Every decoding sequence's controller learns what this step cost it (speculating or not)."""
        comparable = not step.prefills  # a step that also prefilled says little about decoding
        for seq in step.decodes:
            if seq.controller is not None and comparable and id(seq) not in proposals:
                seq.controller.record_plain(seconds)
        for seq, _, _ in proposals.values():
            proposed, kept = seq.spec_step
            seq.controller.record_speculative(seconds if comparable else None, proposed, kept)

    def _forward(self, step: ScheduledStep, proposals: dict | None = None):
        """Flatten the step into tokens, run the model, return logits and which rows belong to whom."""
        bs = self.config.block_size
        device = self.model.device
        tokens: list[int] = []
        decodes, prefills = [], []
        rows: dict[int, tuple[int, int]] = {}  # id(seq) -> (first logits row, number of rows)
        logits_indices: list[int] = []
        for seq in step.decodes:
            tokens.append(seq.token_slice(seq.num_computed, seq.num_computed + 1)[0])
            decodes.append((seq.blocks, seq.num_computed))
            rows[id(seq)] = (len(logits_indices), 1)
            logits_indices.append(len(tokens) - 1)
        for seq, n in step.prefills:
            offset = len(tokens)
            tokens.extend(seq.token_slice(seq.num_computed, seq.num_computed + n))
            prefills.append((seq.blocks, seq.num_computed, n))
            if seq.needs_prompt_logprobs:  # every row: each predicts the next prompt token
                rows[id(seq)] = (len(logits_indices), n)
                logits_indices.extend(range(offset, offset + n))
            elif seq.num_computed + n == seq.num_tokens:  # the chunk reaches the end: sample
                rows[id(seq)] = (len(logits_indices), 1)
                logits_indices.append(offset + n - 1)
        for key, (seq, proposed, _) in (proposals or {}).items():  # verify: every row's logits
            offset = len(tokens)
            tokens.append(seq.token_slice(seq.num_computed, seq.num_computed + 1)[0])
            tokens.extend(proposed)
            n = 1 + len(proposed)
            prefills.append((seq.blocks, seq.num_computed, n))
            rows[key] = (len(logits_indices), n)
            logits_indices.extend(range(offset, offset + n))
        self.cache.batch = build_paged_batch(decodes, prefills, bs, device)
        logits = self.model.forward_paged(torch.tensor(tokens, device=device), self.cache,
                                          torch.tensor(logits_indices, dtype=torch.long, device=device))
        self.cache.batch = None
        return logits, rows

    def _process(self, step: ScheduledStep, logits: torch.Tensor, rows) -> list[RequestOutput]:
        outputs = []
        samplers = []  # (seq, logits row index) of every sequence that samples now
        for seq, n in [(s, 1) for s in step.decodes] + step.prefills:
            start = seq.num_computed
            seq.num_computed += n
            self._register_filled_blocks(seq)
            if id(seq) not in rows:
                continue  # a prompt chunk that does not reach the end yet
            first, count = rows[id(seq)]
            if seq.needs_prompt_logprobs:
                self._record_prompt_logprobs(seq, logits[first:first + count], start)
            if seq.num_computed == seq.num_tokens:
                samplers.append((seq, first + count - 1))
        if not samplers:
            return outputs
        tokens = self._sample(samplers, logits)
        logprob_rows = [(i, seq) for i, (seq, _) in enumerate(samplers) if seq.logprobs is not None]
        token_logprobs = {}
        if logprob_rows:
            idx = torch.tensor([samplers[i][1] for i, _ in logprob_rows], device=logits.device)
            chosen = torch.tensor([tokens[i] for i, _ in logprob_rows], device=logits.device)
            for (i, seq), tl in zip(logprob_rows, self._logprobs(logits[idx], chosen, [s.logprobs for _, s in logprob_rows])):
                token_logprobs[i] = tl
        now = time.perf_counter()
        for i, (seq, _) in enumerate(samplers):
            out = self._append_token(seq, tokens[i], token_logprobs.get(i), now)
            if out is not None:
                outputs.append(out)
        return outputs

    def _register_filled_blocks(self, seq: Sequence) -> None:
        """Give the prefix cache every block of seq that filled up since the last call."""
        if seq.num_computed // self.config.block_size > len(seq.block_hashes):
            self.allocator.register_full_blocks(seq.blocks, seq.all_ids, seq.block_hashes, seq.num_computed)

    def _sample(self, samplers, logits: torch.Tensor) -> list[int]:
        """Greedy rows without penalties in one argmax; every other row through its own Sampler."""
        tokens = [0] * len(samplers)
        plain = [i for i, (seq, _) in enumerate(samplers) if seq.params.greedy and not seq.sampler.needs_counts]
        if plain:
            idx = torch.tensor([samplers[i][1] for i in plain], device=logits.device)
            for i, t in zip(plain, greedy_tokens(logits[idx])):
                tokens[i] = t
        plain_set = set(plain)
        for i, (seq, row) in enumerate(samplers):
            if i not in plain_set:
                tokens[i] = seq.sampler.sample(logits[row])
        return tokens

    @staticmethod
    def _logprobs(rows: torch.Tensor, chosen: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
        """Log-probabilities of the model's distribution (before temperature and penalties), as OpenAI reports."""
        lp = torch.log_softmax(rows.float(), dim=-1)
        picked = lp.gather(1, chosen[:, None])[:, 0].tolist()
        k = max(tops)
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)
        out = []
        for r in range(rows.shape[0]):
            top = list(zip(top_i[r, :tops[r]].tolist(), top_v[r, :tops[r]].tolist())) if k > 0 else []
            out.append(TokenLogprob(int(chosen[r]), picked[r], top))
        return out

    def _record_prompt_logprobs(self, seq: Sequence, rows: torch.Tensor, start: int) -> None:
        # Row j (position start + j) predicts the prompt token at start + j + 1.
        n_prompt = len(seq.prompt_ids)
        want = [j for j in range(rows.shape[0]) if len(seq.prompt_logprob_values) <= start + j + 1 < n_prompt]
        if not want:
            return
        chosen = torch.tensor([seq.prompt_ids[start + j + 1] for j in want], device=rows.device)
        values = self._logprobs(rows[want], chosen, [seq.prompt_logprobs] * len(want))
        seq.prompt_logprob_values.extend(values)

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float,
                      record: bool = True) -> RequestOutput | None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        if record:
            seq.sampler.record(token)
        seq.output_ids.append(token)
        self.num_generated_tokens += 1
        logprobs = [logprob] if logprob is not None else None
        if token in seq.stop_ids:
            tail, stop = _drain(seq.watcher, seq.detok)
            return self._finish(seq, [token], tail, logprobs, "stop", stop if stop is not None else token)
        text, stop = seq.watcher.add(seq.detok.push(token))
        if stop is not None:
            return self._finish(seq, [token], text, logprobs, "stop", stop)
        if len(seq.output_ids) >= seq.params.max_tokens:
            tail, stop = _drain(seq.watcher, seq.detok)
            return self._finish(seq, [token], text + tail, logprobs, "stop" if stop else "length", stop)
        return self._output(seq, [token], text, logprobs)

    def _finish(self, seq, tokens, text, logprobs, reason, stop_reason) -> RequestOutput:
        self.scheduler.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.sequences.pop(seq.request_id, None)
        return self._output(seq, tokens, text, logprobs, finish=(reason, stop_reason))

    def _output(self, seq: Sequence, tokens, text, logprobs, finish=None) -> RequestOutput:
        prompt_lp = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and (tokens or finish):
            prompt_lp, seq.prompt_logprobs_sent = seq.prompt_logprob_values, True
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=tokens, new_text=text, prompt_token_ids=seq.prompt_ids,
            num_output_tokens=len(seq.output_ids), finished=finish is not None,
            finish_reason=finish[0] if finish else None, stop_reason=finish[1] if finish else None,
            new_logprobs=logprobs, prompt_logprobs=prompt_lp, arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time, num_cached_tokens=seq.num_cached_tokens,
        )

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        a = self.allocator
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_blocks_total": a.num_blocks,
            "kv_blocks_used": a.num_used,
            "kv_block_size": a.block_size,
            "prefix_cache_hit_tokens": a.prefix_hits,
            "prefix_cache_query_tokens": a.prefix_queries,
            "num_preemptions": self.scheduler.num_preemptions,
            "generated_tokens": self.num_generated_tokens,
            "prompt_tokens": self.num_prompt_tokens,
            "spec_decode_draft_tokens": self.num_spec_proposed,
            "spec_decode_accepted_tokens": self.num_spec_accepted,
            "spec_decode_steps": self.num_spec_steps,
        }


def merge_outputs(deltas: list[RequestOutput]) -> RequestOutput:
    """One request's several deltas of a step (kept proposals) as one delta."""
    last = deltas[-1]
    if len(deltas) == 1:
        return last
    logprobs = None
    if any(d.new_logprobs for d in deltas):
        logprobs = [lp for d in deltas for lp in (d.new_logprobs or [])]
    prompt_lp = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None)
    return RequestOutput(
        request_id=last.request_id, new_token_ids=[t for d in deltas for t in d.new_token_ids],
        new_text="".join(d.new_text for d in deltas), prompt_token_ids=last.prompt_token_ids,
        num_output_tokens=last.num_output_tokens, finished=last.finished, finish_reason=last.finish_reason,
        stop_reason=last.stop_reason, new_logprobs=logprobs, prompt_logprobs=prompt_lp,
        arrival_time=last.arrival_time, first_token_time=last.first_token_time,
        num_cached_tokens=last.num_cached_tokens)
