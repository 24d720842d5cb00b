"""The engine: requests in, one batched forward pass per step, token deltas out.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=32))
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...

The one decode loop of leapllm: every path that generates (`LLM.run`/`stream`/`chat`, `LLM.generate`,
the server) adds requests here and calls step(). The scheduler decides who runs and counts KV
blocks; the model runner (model_runner.py) owns the caches and turns the step into forward passes;
this file proposes speculative tokens, samples, appends each token to its request (request.py
decides when a request ends) and returns finished requests' blocks. It is synchronous and
single-threaded: async_engine.py runs it in a background thread for the server.

`LLM.run` uses an engine with EngineConfig(single_sequence=True) (see `single_sequence_config`):
one request at a time on a contiguous cache, where a quantized model's decode step is one fused
C++ call.

An encoder-decoder (T5, BART, mBART, Marian) runs here too: a request brings its source
(`encoder_ids`) and its decoder's start token as the prompt, and a logits processor for the
generation rules transformers applies (engine/seq2seq.py builds both). The KV budget is split
between the decoder's pool and the sources' cross-attention pool, and prefix caching is off: the
decoder's tokens alone do not say which source they belong to.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import torch

from leapllm.config import EngineConfig, SpeculativeConfig
from leapllm.engine.beam_search import BeamGroup, BeamSearchParams
from leapllm.engine.block_allocator import BlockAllocator, extend_block_hashes
from leapllm.engine.cpu_threads import FreeCoreThreads
from leapllm.engine.model_runner import ModelRunner
from leapllm.engine.request import (
    LogitsProcessor,
    Request,
    RequestOutput,
    RequestStatus,
    TokenLogprob,
    check_token_ids,
    fit_prompt,
)
from leapllm.engine.sampling import SamplingParams, greedy_tokens, sample_rows
from leapllm.engine.scheduler import KVGroup, ScheduledStep, Scheduler, held_blocks
from leapllm.engine.speculative import (
    NgramProposer,
    SpeculationController,
    draft_sampler,
    verify_proposals,
)
from leapllm.engine.structured_output import GrammarCompiler, allowed_tokens
from leapllm.errors import InvalidRequestError
from leapllm.model.paged_kv_cache import PagedKVCache
from leapllm.model.seq2seq import Seq2SeqModel
from leapllm.tokenization import Tokenizer

MAX_LOGPROBS = 20


def single_sequence_config(context_length: int, speculative: SpeculativeConfig | None = None,
                           block_size: int = 16, kv_cache_dtype: str = "auto", enforce_eager: bool = False
                           ) -> EngineConfig:
    """The engine settings of `LLM.run`: one request at a time, its whole prompt in one pass, on a
    contiguous cache (the blocks are only counted, so that a request that fits the context fits; on
    a GPU the runner uses them, as a paged pool whose decode steps replay a CUDA graph)."""
    return EngineConfig(max_num_seqs=1, max_num_batched_tokens=context_length, block_size=block_size,
                        num_blocks=-(-context_length // block_size), enable_prefix_caching=False,
                        kv_cache_dtype=kv_cache_dtype, single_sequence=True, speculative=speculative,
                        enforce_eager=enforce_eager)


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        config.validate()
        c = model.config
        self.encoder_decoder = isinstance(model, Seq2SeqModel)
        self.vocab_size = c.decoder_vocab_size if self.encoder_decoder else c.vocab_size
        if self.encoder_decoder:
            self._init_encoder_decoder()
            return
        # KV groups (scheduler.py): a model that mixes windowed and full layers (Gemma) keeps the
        # windowed layers' keys in a pool of their own, whose out-of-window blocks are freed. A draft
        # model (which may see everything) shares the block tables, so with one nothing is freed.
        draft = config.speculative is not None and config.speculative.method == "draft"
        windowed = () if draft else c.windowed_layers
        hybrid = 0 < len(windowed) < c.num_layers
        full_blocks, window_blocks = self._pool_sizes(model, config, len(windowed) if hybrid else 0)
        self.runner = ModelRunner(model, config, full_blocks, windowed if hybrid else (), window_blocks)
        self.allocator = BlockAllocator(full_blocks, config.block_size, config.enable_prefix_caching)
        groups = [KVGroup(self.allocator, c.kv_window if windowed and not hybrid else None)]
        if hybrid:
            groups.append(KVGroup(BlockAllocator(window_blocks, config.block_size, config.enable_prefix_caching),
                                  c.sliding_window))
        self.scheduler = Scheduler(groups, config.max_num_seqs, config.max_num_batched_tokens)
        self._init_state()

    def _init_encoder_decoder(self) -> None:
        """Two KV groups: the decoder's self-attention pool and the sources' cross-attention pool."""
        if self.config.single_sequence or self.config.speculative is not None:
            raise InvalidRequestError("an encoder-decoder runs on the paged engine, without speculative decoding")
        self.config = config = dataclasses.replace(self.config, enable_prefix_caching=False)
        c, bs = self.model.config, config.block_size
        if config.num_blocks is not None:
            num_blocks = num_source_blocks = config.num_blocks
        else:  # half of the budget each
            per_block = PagedKVCache.bytes_per_block(c.decoder_layers, bs, c.num_heads, c.head_dim, self.model.dtype,
                                                     config.kv_cache_dtype, self.model.device)
            num_blocks = num_source_blocks = int(config.kv_cache_gb * 2**30) // (2 * per_block)
            if num_blocks < 1:
                raise InvalidRequestError(f"a KV cache of {config.kv_cache_gb} GB holds no block of "
                                          f"{2 * per_block / 2**20:.2f} MiB")
        self.runner = ModelRunner(self.model, config, num_blocks, num_source_blocks=num_source_blocks)
        self.allocator = BlockAllocator(num_blocks, bs, enable_prefix_caching=False)
        groups = [KVGroup(self.allocator), KVGroup(BlockAllocator(num_source_blocks, bs, False), holds_source=True)]
        self.scheduler = Scheduler(groups, config.max_num_seqs, config.max_num_batched_tokens)
        self._init_state()

    def _init_state(self) -> None:
        config, model = self.config, self.model
        self.sequences: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.speculative = config.speculative
        self.num_spec_proposed = self.num_spec_accepted = self.num_spec_steps = 0
        # Where speculation's time goes (seconds): proposing, verification steps, plain decode steps.
        self.spec_seconds = {"propose_s": 0.0, "verify_s": 0.0, "plain_s": 0.0}
        self.num_plain_steps = 0  # decode steps without proposals while speculation is on
        self._pending_copies: list[tuple[int, int]] = []  # beam search's copy-on-write of this step
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        on_cpu = torch.device(model.device).type == "cpu"
        self.cpu_threads = FreeCoreThreads(torch.get_num_threads()) if on_cpu and config.follow_free_cores else None

    @staticmethod
    def _pool_sizes(model, config: EngineConfig, num_windowed: int) -> tuple[int, int]:
        """Blocks of the full layers' pool and of the windowed layers' (0 when they share one).

        The windowed pool gets what its layers can ever hold at once, a window and a step's tokens
        per running sequence (or as many blocks as the full pool, if that is fewer); the rest of
        --kv-cache-gb goes to the full layers."""
        c = model.config
        # A tensor-parallel rank (distributed/runtime.py) caches only the kv heads of its own shard.
        per_layer = PagedKVCache.bytes_per_block(1, config.block_size, model.num_cached_kv_heads, c.head_dim,
                                                 model.dtype, config.kv_cache_dtype, model.device)
        num_full = c.num_layers - num_windowed
        most = 0
        if num_windowed:
            bs = config.block_size
            most = config.max_num_seqs * (-(-c.sliding_window // bs) + 2) + -(-config.max_num_batched_tokens // bs)
        if config.num_blocks is not None:
            return config.num_blocks, min(config.num_blocks, most)
        budget = int(config.kv_cache_gb * 2**30)
        equal = budget // (per_layer * c.num_layers)
        window_blocks = min(equal, most)
        full_blocks = (budget - window_blocks * per_layer * num_windowed) // (per_layer * num_full)
        if full_blocks < 1:
            raise InvalidRequestError(f"a KV cache of {config.kv_cache_gb} GB holds no block of "
                                      f"{per_layer * c.num_layers / 2**20:.2f} MiB")
        return full_blocks, window_blocks

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    encoder_ids: list[int] | None = None, logits_processor: LogitsProcessor | None = None,
                    beam_search: BeamSearchParams | None = None) -> None:
        """Queue a request; raises InvalidRequestError if it can never run (too long, bad ids, ...).

        An encoder-decoder's request gives its source as encoder_ids and its decoder's start token(s)
        as prompt_ids; logits_processor (any model) rewrites each next-token distribution before
        sampling. beam_search (an encoder-decoder's): search with its beams instead of sampling; the
        request's one output comes when the search ends."""
        if request_id in self.sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.check_request(prompt_ids, params, logprobs, prompt_logprobs, encoder_ids, beam_search)
        matcher = None
        if params.structured_output is not None:  # compiled (or found in the cache) by check_request
            matcher = self.grammars.matcher(params.structured_output)
        seq = Request(request_id, prompt_ids, params, self.tokenizer, self.vocab_size, self.model.device,
                      logprobs=logprobs, prompt_logprobs=prompt_logprobs, matcher=matcher,
                      encoder_ids=list(encoder_ids) if encoder_ids is not None else None,
                      logits_processor=logits_processor)
        if beam_search is not None:
            seq.beam_group = BeamGroup(beam_search, prompt_ids, params.max_tokens, sorted(seq.stop_ids),
                                       self.model.device)
            seq.beam_group.beams = [seq]
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
                      prompt_logprobs: int | None = None, encoder_ids: list[int] | None = None,
                      beam_search: BeamSearchParams | None = None) -> list[int]:
        """The prompt ids the request will run with (truncated if it asked); raises InvalidRequestError
        if it can never run. Reads only fixed settings, so any thread may call it."""
        c = self.model.config
        beams = 1
        if beam_search is not None:
            self._check_beam_search(beam_search, params, logprobs, prompt_logprobs)
            beams = beam_search.num_beams
        if self.encoder_decoder:
            self._check_source(encoder_ids)
        elif encoder_ids is not None:
            raise InvalidRequestError("this model has no encoder: a request takes no source (encoder_ids)")
        prompt_ids = fit_prompt(list(prompt_ids), params, c.context_length)
        check_token_ids(prompt_ids, self.vocab_size)
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        for g in self.scheduler.groups:
            if g.holds_source:
                continue  # checked with the source
            positions = len(prompt_ids) + params.max_tokens
            if g.window is not None:  # at most a window and a step's tokens are held at once
                positions = min(positions, g.window + self.config.max_num_batched_tokens + self.config.block_size)
            need = g.allocator.blocks_needed(positions) * beams
            if need > g.allocator.num_blocks:
                raise InvalidRequestError(
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV-cache "
                    f"blocks; the pool has {g.allocator.num_blocks} (raise --kv-cache-gb)")
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)  # raises for a constraint that does not compile
        return prompt_ids

    def _check_beam_search(self, beam_search: BeamSearchParams, params: SamplingParams, logprobs, prompt_logprobs):
        if not self.encoder_decoder:
            raise InvalidRequestError("beam search runs on encoder-decoder models only")
        if not isinstance(beam_search.num_beams, int) or not 2 <= beam_search.num_beams <= self.config.max_num_seqs:
            raise InvalidRequestError(f"num_beams must be between 2 and the engine's max_num_seqs "
                                      f"({self.config.max_num_seqs}), got {beam_search.num_beams}")
        if params.structured_output is not None or logprobs is not None or prompt_logprobs is not None:
            raise InvalidRequestError("beam search takes no structured output and reports no logprobs")

    def _check_source(self, encoder_ids: list[int] | None) -> None:
        c = self.model.config
        if not encoder_ids:
            raise InvalidRequestError("an encoder-decoder request needs a source of at least one token")
        limit = c.max_source_tokens
        if limit is not None and len(encoder_ids) > limit:
            raise InvalidRequestError(f"a source has {len(encoder_ids)} tokens; this model reads at most {limit}")
        check_token_ids(list(encoder_ids), c.vocab_size)
        sources = self.scheduler.groups[1].allocator
        if sources.blocks_needed(len(encoder_ids)) > sources.num_blocks:
            raise InvalidRequestError(f"a source of {len(encoder_ids)} tokens needs more than the "
                                      f"{sources.num_blocks} blocks of the cross-attention pool (raise --kv-cache-gb)")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (finish_reason "abort"), or None if unknown."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        for s in seq.beam_group.beams if seq.beam_group is not None else [seq]:
            self.scheduler.free(s)
            self.runner.free(s)
            s.status = RequestStatus.FINISHED
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
        for seq in step.preempted:
            seq.draft_computed = 0
            self.runner.free(seq)
        self._settle_beams(step)
        if step.empty:
            return []
        if self.cpu_threads is not None:
            self.cpu_threads.update()
        proposals = self._propose(step) if self.speculative is not None else {}
        proposed = time.perf_counter()
        if proposals:  # verified as chunks of [last token, proposals...], after the plain decodes
            step.decodes = [seq for seq in step.decodes if id(seq) not in proposals]
        step.decodes.sort(key=lambda seq: seq.num_computed, reverse=True)  # attention groups by length
        masks = self._start_masks(step)
        logits, rows = self.runner.execute(step, proposals)
        outputs = self._process(step, logits, rows, masks)
        if proposals:
            outputs += self._process_speculative(proposals, logits, rows)
        if self.speculative is not None:
            done = time.perf_counter()
            self._record_step_time(step, proposals, done - started)
            if proposals or step.decodes:
                self.spec_seconds["propose_s"] += proposed - started
                self.spec_seconds["verify_s" if proposals else "plain_s"] += done - proposed
                self.num_plain_steps += not proposals
        return outputs

    def run_requests(self, requests: list[tuple[str, list[int], SamplingParams, dict]]
                     ) -> dict[str, list[RequestOutput]]:
        """Add these requests ((id, prompt ids, params, add_request's other arguments), checked by the
        caller) and step until every one has finished: each one's outputs, in order. `LLM.generate`
        and `Seq2SeqLM.generate`. An interrupted call leaves nothing behind: the unfinished are aborted."""
        outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id, *_ in requests}
        finished: set[str] = set()
        try:
            for request_id, prompt_ids, params, extra in requests:
                self.add_request(request_id, prompt_ids, params, **extra)
            while self.has_unfinished() and len(finished) < len(requests):
                for out in self.step():
                    if out.request_id in outputs:
                        outputs[out.request_id].append(out)
                        if out.finished:
                            finished.add(out.request_id)
        finally:
            for request_id in outputs:
                if request_id not in finished:
                    self.abort_request(request_id)
        return outputs

    def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Add one request and step until it finishes, yielding its deltas: `LLM.run` and `stream` on a
        single-sequence engine. Closing the iterator early aborts the request."""
        self.add_request(request_id, prompt_ids, params)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort_request(request_id)

    # -- speculative decoding ------------------------------------------------------------------
    def _propose(self, step: ScheduledStep) -> dict[int, tuple]:
        """id(seq) -> (seq, proposals, draft distributions or None) for the decodes that speculate now."""
        spec = self.speculative
        if not step.decodes or len(step.decodes) > spec.max_batch_size:
            return {}
        spare = self.config.max_num_batched_tokens - step.num_tokens
        bs = self.config.block_size
        wanted: list[tuple[Request, int]] = []
        for seq in step.decodes:
            if seq.logprobs is not None or seq.controller is None or seq.matcher is not None:
                continue  # per-token logprobs and masks are made for single-token steps only
            k = min(seq.controller.num_tokens(), spare, seq.params.max_tokens - len(seq.output_ids) - 1)
            if k <= 0:
                continue
            # Room for k more positions: grow into free blocks, never preempting anyone for it.
            if not self.scheduler.reserve(seq, seq.num_computed + 1 + k):
                k = min(k, min(map(len, seq.block_tables)) * bs - seq.num_computed - 1)
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
        return self.runner.propose_with_draft(wanted)

    def _process_speculative(self, proposals: dict[int, tuple], logits: torch.Tensor, rows) -> list[RequestOutput]:
        outputs = []
        now = time.perf_counter()
        for key, (seq, tokens, draft_probs) in proposals.items():
            first, count = rows[key]
            emitted = verify_proposals(seq.sampler, logits[first:first + count], tokens, draft_probs)
            kept = len(emitted) - 1
            seq.num_computed += 1 + kept  # the last token and the kept proposals are in the cache now
            if self.runner.draft is not None:
                seq.draft_computed += min(kept, len(tokens) - 1)
            seq.spec_step = (len(tokens), kept)
            self.num_spec_proposed += len(tokens)
            self.num_spec_accepted += kept
            self.num_spec_steps += 1
            deltas = []
            for token in emitted:
                deltas.append(self._append_token(seq, token, None, now, record=False))
                if deltas[-1].finished:
                    break
            if seq.status is not RequestStatus.FINISHED:
                self._register_filled_blocks(seq)
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

    def _start_masks(self, step: ScheduledStep):
        """The constrained requests that sample in this step, and a Future of their next token masks,
        computed while the forward pass runs; None when no request in the step is constrained."""
        constrained = [seq for seq in step.decodes if seq.matcher is not None]
        constrained += [seq for seq, n in step.prefills
                        if seq.matcher is not None and seq.num_computed + n == seq.num_tokens]
        if not constrained:
            return None
        return {id(seq): i for i, seq in enumerate(constrained)}, \
            self.grammars.fill_masks_async([seq.matcher for seq in constrained])

    def _process(self, step: ScheduledStep, logits: torch.Tensor, rows, masks=None) -> list[RequestOutput]:
        outputs = []
        samplers = []  # (seq, logits row index) of every sequence that samples now
        beam_rows: dict[int, int] = {}  # id(beam) -> its logits row, for the beams of beam searches
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
                if seq.beam_group is not None:
                    beam_rows[id(seq)] = first + count - 1
                else:
                    samplers.append((seq, first + count - 1))
        if beam_rows:
            outputs += self._advance_beams(logits, beam_rows)
        if not samplers:
            return outputs
        scores = self._apply_masks(samplers, logits, masks) if masks else logits
        if any(seq.logits_processor is not None for seq, _ in samplers):
            # The model's own logits stay for the logprobs asked for (a masked copy is one already).
            if scores is logits and any(seq.logprobs is not None for seq, _ in samplers):
                scores = logits.clone()
            self._apply_processors(samplers, scores)
        tokens = self._sample(samplers, scores)
        logprob_rows = [(i, seq) for i, (seq, _) in enumerate(samplers) if seq.logprobs is not None]
        token_logprobs = {}
        if logprob_rows:
            idx = torch.tensor([samplers[i][1] for i, _ in logprob_rows], device=logits.device)
            chosen = torch.tensor([tokens[i] for i, _ in logprob_rows], device=logits.device)
            for (i, seq), tl in zip(logprob_rows, self._logprobs(logits[idx], chosen, [s.logprobs for _, s in logprob_rows])):
                token_logprobs[i] = tl
        now = time.perf_counter()
        for i, (seq, _) in enumerate(samplers):
            outputs.append(self._append_token(seq, tokens[i], token_logprobs.get(i), now))
        return outputs

    # -- beam search ---------------------------------------------------------------------------
    def _settle_beams(self, step: ScheduledStep) -> None:
        """A beam search steps with all of its beams or not at all: one whose beam was preempted
        starts over (from its first beam, with no blocks; the search is deterministic, and nothing
        was sent yet), and one not wholly in this step leaves it."""
        if not self.encoder_decoder:
            return  # (beam search runs on encoder-decoders only: nothing to settle on a decoder's steps)
        restarted = {id(s.beam_group): s.beam_group for s in step.preempted if s.beam_group is not None}
        for group in restarted.values():
            self._restart_beams(group)
        in_step = {id(s) for s in step.decodes} | {id(s) for s, _ in step.prefills}

        def leaves(seq: Request) -> bool:
            group = seq.beam_group
            return group is not None and (id(group) in restarted or any(id(b) not in in_step for b in group.beams))

        step.decodes = [s for s in step.decodes if not leaves(s)]
        step.prefills = [(s, n) for s, n in step.prefills if not leaves(s)]

    def _restart_beams(self, group: BeamGroup) -> None:
        for beam in group.beams:
            self.scheduler.free(beam)
            self.runner.free(beam)
        first = group.beams[0]
        first.output_ids = []
        group.reset()
        group.beams = [first]
        self.scheduler.requeue_first(first)

    def _advance_beams(self, logits: torch.Tensor, beam_rows: dict[int, int]) -> list[RequestOutput]:
        """One step of every beam search whose beams got logits: its outputs when it ends, else
        each beam continues its parent's blocks and tokens with its new token."""
        outputs = []
        groups = {id(s.beam_group): s.beam_group for s in self.scheduler.running if id(s) in beam_rows}
        for group in groups.values():
            if group.beams[0].status is not RequestStatus.RUNNING:
                continue  # restarted by another search's first step, which needed its blocks
            rows = torch.tensor([beam_rows[id(b)] for b in group.beams], device=logits.device)
            result = group.advance(logits[rows])
            if result.result is None:
                self._pending_copies += self._fork_beams(group, result.parents, result.tokens)
                continue
            first = group.beams[0]
            for beam in group.beams:
                self.scheduler.free(beam)
                self.runner.free(beam)
                beam.status = RequestStatus.FINISHED
            self.sequences.pop(first.request_id, None)
            tokens = result.result
            self.num_generated_tokens += len(tokens)
            ended = bool(tokens) and tokens[-1] in first.stop_ids
            first.output_ids = tokens
            first.first_token_time = time.perf_counter()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            finish = ("stop", tokens[-1]) if ended else ("length", None)
            outputs.append(self._output(first, tokens, text, None, finish, score=group.score))
        self._copy_pending_blocks()
        return outputs

    def _copy_pending_blocks(self) -> None:
        """The step's copy-on-write copies, in one pass over the pools (before anything frees their blocks)."""
        if self._pending_copies:
            self.runner.copy_blocks(self._pending_copies)
            self._pending_copies = []

    def _fork_beams(self, group: BeamGroup, parents: list[int], tokens: list[int]) -> list[tuple[int, int]]:
        """Beam i continues beam parents[i] with tokens[i]: it takes a reference to each of the parent's
        blocks, and a copy of the partly filled last one where several beams would write into it.
        Returns the copies to make (source block, destination block) before the next step."""
        old = group.beams
        slots = old
        kv = self.scheduler.groups[0].allocator
        computed = old[0].num_computed
        if len(old) < group.num_beams:  # the first step: the other beams start as copies of the first
            first = old[0]
            parents = [0] * len(parents)  # every beam was the first one until now
            copies_needed = group.num_beams - 1 if computed % self.config.block_size else 0
            while kv.num_free < copies_needed and self._preempt_one(keep=old):
                pass
            slots = [first]
            for i in range(1, group.num_beams):
                beam = Request(f"{first.request_id}#beam{i}", first.prompt_ids, first.params, self.tokenizer,
                               self.vocab_size, self.model.device, encoder_ids=first.encoder_ids)
                beam.beam_group, beam.arrival_time = group, first.arrival_time
                slots.append(beam)
            self.scheduler.add_running_after(first, slots[1:])
            self.runner.share_source(first, slots[1:])
        tables = [[list(t) for t in old[p].block_tables] for p in parents]
        histories = [(old[p].output_ids + [t], list(old[p].block_hashes)) for p, t in zip(parents, tokens, strict=True)]
        for new_tables in tables:
            for g, table in zip(self.scheduler.groups, new_tables):
                g.allocator.share(held_blocks(table))
        for beam in old:
            for g, table in zip(self.scheduler.groups, beam.block_tables):
                g.allocator.release(held_blocks(table))
        copies = []
        if computed % self.config.block_size:  # the next token goes into the last block: one writer each
            for new_tables in tables:
                last = new_tables[0][-1]
                if kv.ref_count[last] > 1:
                    fresh = kv.allocate(1)[0]
                    kv.release([last])
                    new_tables[0][-1] = fresh
                    copies.append((last, fresh))
        for beam, new_tables, (output_ids, hashes) in zip(slots, tables, histories, strict=True):
            beam.block_tables, beam.output_ids, beam.block_hashes = new_tables, output_ids, hashes
            beam.num_computed = computed
        group.beams = slots
        return copies

    def _preempt_one(self, keep: list[Request]) -> bool:
        """Free blocks outside a step: preempt the latest running sequence not in keep (a beam search
        whole); False if there is none."""
        self._copy_pending_blocks()  # a freed block may become another copy's destination
        victim = self.scheduler.preempt_last(keep)
        if victim is None:
            return False
        self.runner.free(victim)
        if victim.beam_group is not None:
            self._restart_beams(victim.beam_group)
        return True

    def _register_filled_blocks(self, seq: Request) -> None:
        """Give the prefix cache every block of seq that filled up since the last call."""
        first = len(seq.block_hashes)
        if seq.num_computed // self.config.block_size > first:
            extend_block_hashes(seq.block_hashes, seq.all_ids, seq.num_computed, self.config.block_size)
            for g, table in zip(self.scheduler.groups, seq.block_tables):
                g.allocator.register(table, seq.block_hashes, first)

    def _apply_masks(self, samplers, logits: torch.Tensor, masks) -> torch.Tensor:
        """A copy of the logits with every constrained row's disallowed tokens at -inf (logprobs
        are still reported from the model's own distribution)."""
        order, future = masks
        bitmask = future.result()
        picked = [(row, order[id(seq)]) for seq, row in samplers if id(seq) in order]
        dev = logits.device
        rows = torch.tensor([r for r, _ in picked], device=dev)
        allowed = allowed_tokens(bitmask[[m for _, m in picked]], logits.shape[-1], dev)
        dead = ~allowed.any(dim=1)
        if bool(dead.any()):  # a matcher that failed (a parser limit): let it end on a stop token
            stops = [t for t in self.tokenizer.stop_token_ids if t < logits.shape[-1]]
            allowed[dead.nonzero()[:, 0][:, None], torch.tensor(stops, device=dev)[None, :]] = True
        masked = logits.clone()
        masked[rows] = masked[rows].masked_fill(~allowed, float("-inf"))
        return masked

    @staticmethod
    def _apply_processors(samplers, scores: torch.Tensor) -> None:
        """Rewrite each processed row of scores (in place) with its request's logits processor: one
        call for the rows of one processor (an encoder-decoder batch's plan) and one length."""
        together: dict[tuple[int, int], list] = {}
        for seq, row in samplers:
            if seq.logits_processor is not None:
                together.setdefault((id(seq.logits_processor), seq.num_tokens), []).append((seq, row))
        for members in together.values():
            ids = torch.tensor([seq.all_ids for seq, _ in members], device=scores.device)  # (rows, length)
            rows = torch.tensor([row for _, row in members], device=scores.device)
            scores[rows] = members[0][0].logits_processor(ids, scores[rows])

    def _sample(self, samplers, logits: torch.Tensor) -> list[int]:
        """Greedy rows without penalties in one argmax (through NumPy on the CPU); the others in
        sample_rows' batch, with one read back to the host."""
        tokens = [0] * len(samplers)
        plain = [i for i, (seq, _) in enumerate(samplers) if seq.params.greedy and not seq.sampler.needs_counts]
        if len(plain) == 1:  # batch 1: a view of the row, not a gathered copy
            row = samplers[plain[0]][1]
            tokens[plain[0]] = greedy_tokens(logits[row:row + 1])[0]
        elif plain:
            idx = torch.tensor([samplers[i][1] for i in plain], device=logits.device)
            for i, t in zip(plain, greedy_tokens(logits[idx])):
                tokens[i] = t
        plain_set = set(plain)
        rest = [i for i in range(len(samplers)) if i not in plain_set]
        if rest:
            idx = torch.tensor([samplers[i][1] for i in rest], device=logits.device)
            for i, t in zip(rest, sample_rows([samplers[i][0].sampler for i in rest], logits[idx])):
                tokens[i] = t
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

    def _record_prompt_logprobs(self, seq: Request, rows: torch.Tensor, start: int) -> None:
        # Row j (position start + j) predicts the prompt token at start + j + 1.
        n_prompt = len(seq.prompt_ids)
        want = [j for j in range(rows.shape[0]) if len(seq.prompt_logprob_values) <= start + j + 1 < n_prompt]
        if not want:
            return
        chosen = torch.tensor([seq.prompt_ids[start + j + 1] for j in want], device=rows.device)
        values = self._logprobs(rows[want], chosen, [seq.prompt_logprobs] * len(want))
        seq.prompt_logprob_values.extend(values)

    def _append_token(self, seq: Request, token: int, logprob: TokenLogprob | None, now: float,
                      record: bool = True) -> RequestOutput:
        if seq.first_token_time is None:
            seq.first_token_time = now
        if record:
            seq.sampler.record(token)
        self.num_generated_tokens += 1
        logprobs = [logprob] if logprob is not None else None
        text, finish = seq.append_token(token)
        if finish is not None:
            self.scheduler.free(seq)
            self.runner.free(seq)
            seq.status = RequestStatus.FINISHED
            self.sequences.pop(seq.request_id, None)
        return self._output(seq, [token], text, logprobs, finish)

    def _output(self, seq: Request, tokens, text, logprobs, finish=None, score: float | None = None) -> RequestOutput:
        prompt_lp = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and (tokens or finish):
            prompt_lp, seq.prompt_logprobs_sent = seq.prompt_logprob_values, True
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=tokens, new_text=text, prompt_token_ids=seq.prompt_ids,
            num_output_tokens=len(seq.output_ids), finished=finish is not None,
            finish_reason=finish[0] if finish else None, stop_reason=finish[1] if finish else None,
            new_logprobs=logprobs, prompt_logprobs=prompt_lp, arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time, num_cached_tokens=seq.num_cached_tokens, score=score,
        )

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        a = self.allocator
        # A model with windowed layers in a pool of their own (scheduler.KVGroup): that pool's blocks.
        second = self.scheduler.groups[1] if len(self.scheduler.groups) > 1 else None
        windowed = second.allocator if second is not None and not second.holds_source else None
        out = {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_blocks_total": a.num_blocks,
            "kv_blocks_used": a.num_used,
            "kv_block_size": a.block_size,
            "kv_window_blocks_total": windowed.num_blocks if windowed else 0,
            "kv_window_blocks_used": windowed.num_used if windowed else 0,
            "prefix_cache_hit_tokens": a.prefix_hits,
            "prefix_cache_query_tokens": a.prefix_queries,
            "num_preemptions": self.scheduler.num_preemptions,
            "generated_tokens": self.num_generated_tokens,
            "prompt_tokens": self.num_prompt_tokens,
            "spec_decode_draft_tokens": self.num_spec_proposed,
            "spec_decode_accepted_tokens": self.num_spec_accepted,
            "spec_decode_steps": self.num_spec_steps,
        }
        if second is not None and second.holds_source:  # an encoder-decoder's cross-attention pool
            out["kv_source_blocks_total"] = second.allocator.num_blocks
            out["kv_source_blocks_used"] = second.allocator.num_used
        return out


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
