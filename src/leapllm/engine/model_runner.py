"""The model runner: turns a scheduled step into forward passes and returns the logits rows the
engine samples from. It owns the KV caches; the scheduler only counts blocks.

Two layouts, chosen by EngineConfig.single_sequence:
- paged (the serving engine): every sequence's keys and values live in one pool of blocks; a step's
  tokens (decodes, prefill chunks, speculative verification chunks) are flattened into one forward
  pass, with a PagedAttentionBatch that says where each token's keys go and what it attends to.
- single sequence (`LLM.run`, `stream`, `chat`, `leapllm generate`): one request at a time on a
  contiguous cache of its own, so that a decode step of a quantized model on the CPU is one fused
  C++ call (model/fused_decode.py), the fastest batch-1 path.

A draft model's proposals (speculative decoding) run here too, on a draft cache of the same layout.

On a GPU (with Triton) a paged step is described per sequence and attention reads the pool in place
(kernels/paged_attention.py); decode-only steps then replay CUDA graphs (engine/decode_graphs.py)
unless `enforce_eager` is set.

An encoder-decoder (model/seq2seq.py) runs paged only: the decoder's keys and values in the first
pool, each request's source as cross-attention keys and values in a second one (its second block
table). A request's source is encoded in the first step it runs in (again after a preemption, which
gave its blocks back), the step's new sources in one batch.
"""

from __future__ import annotations

import torch

from leapllm.config import EngineConfig
from leapllm.engine.decode_graphs import DecodeGraphs
from leapllm.engine.request import Request
from leapllm.engine.scheduler import ScheduledStep
from leapllm.engine.speculative import draw_proposal
from leapllm.kernels.paged_attention import triton_supports
from leapllm.model.kv_cache import KVCache, kv_storage_dtype
from leapllm.model.llama import Transformer
from leapllm.model.paged_kv_cache import (
    PagedAttentionBatch,
    PagedKVCache,
    build_cross_batch,
    build_paged_batch,
    slot_table,
)
from leapllm.model.seq2seq import Seq2SeqModel

# key -> (first logits row, number of rows) of each sequence that gets logits this step; the key is
# id(seq), as the engine's proposals are keyed.
Rows = dict[int, tuple[int, int]]


def step_layout(model, config: EngineConfig) -> tuple[bool, bool]:
    """(whether paged steps are described per sequence for attention in place, whether decode steps
    replay CUDA graphs) for a decoder model on the paged engine.

    In place: a GPU with Triton, keys stored in the model's dtype (not int8), and ropes that do not
    depend on a pass's length (LongRoPE and dynamic NTK read the decode groups' and chunks' lengths).
    Graphs: in place, not enforce_eager, a model of this process (a tensor-parallel one talks to its
    ranks in each step) and no step that reads values back to the host (a mixture-of-experts layer
    picks its experts' code by the routing)."""
    kv_dtype = kv_storage_dtype(config.kv_cache_dtype, model.dtype, model.device)
    in_place = (config.kv_cache_dtype != "int8" and model.rope_threshold is None
                and triton_supports(torch.device(model.device), model.dtype, kv_dtype, config.block_size))
    graphs = in_place and not config.enforce_eager and isinstance(model, Transformer) and not model.config.num_experts
    return in_place, graphs


class ModelRunner:
    def __init__(self, model, config: EngineConfig, num_blocks: int, windowed_layers: tuple[int, ...] = (),
                 num_window_blocks: int = 0, num_source_blocks: int = 0):
        self.model = model
        self.config = config
        self.draft = config.speculative.draft_model if config.speculative is not None else None
        self.windowed_layers = windowed_layers
        c = model.config
        self.encoder_decoder = isinstance(model, Seq2SeqModel)
        self.single_sequence = self.per_sequence = False
        self.decode_graphs: DecodeGraphs | None = None
        if self.encoder_decoder:
            # num_source_blocks: the cross-attention pool, indexed by each request's second block table.
            self.cache = model.new_paged_cache(num_blocks, num_source_blocks, config.block_size, config.kv_cache_dtype)
            self.encoded: set[int] = set()  # id() of the sequences whose source is in the cross-attention pool
            return
        self.per_sequence, graphs = step_layout(model, config)
        # One request on a contiguous cache is the CPU's fastest batch-1 path (the fused C++ step); on
        # a GPU the paged step replayed from a graph is.
        self.single_sequence = config.single_sequence and not graphs
        if self.single_sequence:
            self.caches: dict[str, KVCache] = {}  # request id -> its contiguous cache
            self.draft_caches: dict[str, KVCache] = {}
            return
        # windowed_layers: in a model that mixes windowed and full layers, the windowed ones, whose keys
        # live in a pool of num_window_blocks blocks indexed by each sequence's second block table.
        scratch = 1 if graphs else 0  # a block past the allocator's in each pool, for graphs' padding rows
        self.cache = PagedKVCache(c.num_layers, num_blocks + scratch, config.block_size, model.num_cached_kv_heads,
                                  c.head_dim, model.dtype, model.device, config.kv_cache_dtype, windowed_layers,
                                  num_window_blocks + scratch if windowed_layers else 0)
        if graphs:
            scratch_blocks = (num_blocks, num_window_blocks) if windowed_layers else (num_blocks,)
            self.decode_graphs = DecodeGraphs(model, self.cache, config.block_size,
                                              -(-c.context_length // config.block_size) + 1, scratch_blocks,
                                              config.max_num_seqs, capture=torch.device(model.device).type == "cuda")
        self.draft_cache: PagedKVCache | None = None
        if self.draft is not None:
            # The draft's keys and values live in a pool of its own shape, indexed by the same block
            # tables as the target's: a sequence's blocks hold both models' entries for its positions.
            d = self.draft
            self.draft_cache = PagedKVCache(d.config.num_layers, num_blocks, config.block_size,
                                            d.num_cached_kv_heads, d.config.head_dim, d.dtype, d.device)

    def free(self, seq: Request) -> None:
        """Forget a request's caches (finished, aborted or preempted); paged blocks are the allocator's."""
        if self.encoder_decoder:
            self.encoded.discard(id(seq))
        elif self.single_sequence:
            self.caches.pop(seq.request_id, None)
            self.draft_caches.pop(seq.request_id, None)

    def share_source(self, seq: Request, beams: list[Request]) -> None:
        """New beams of seq read its source's cross-attention keys and values (shared blocks)."""
        if self.encoder_decoder and id(seq) in self.encoded:
            self.encoded.update(id(beam) for beam in beams)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared self-attention blocks (source, destination) before a beam writes."""
        self.cache.self_kv.copy_blocks(pairs)  # (beam search runs on encoder-decoders only)

    # -- the target's forward pass -------------------------------------------------------------
    @staticmethod
    def step_chunks(step: ScheduledStep, proposals: dict[int, tuple]) -> list[tuple]:
        """The step's pieces in forward order, as (key, sequence, tokens, whether it is a decode, whether
        every row's logits are wanted, whether the last row's is, whether it verifies proposals):
        decodes (the last row, to sample); prompt chunks (every row when they asked for prompt
        logprobs, else the last row if the chunk reaches the end of the prompt); verification chunks
        [last token, proposals...] (every row)."""
        chunks = [(id(seq), seq, seq.token_slice(seq.num_computed, seq.num_computed + 1), True, False, True, False)
                  for seq in step.decodes]
        for seq, n in step.prefills:
            chunks.append((id(seq), seq, seq.token_slice(seq.num_computed, seq.num_computed + n), False,
                           seq.needs_prompt_logprobs, seq.num_computed + n == seq.num_tokens, False))
        for key, (seq, proposed, _) in proposals.items():
            chunks.append((key, seq, seq.token_slice(seq.num_computed, seq.num_computed + 1) + proposed, False,
                           True, True, True))
        return chunks

    def execute(self, step: ScheduledStep, proposals: dict[int, tuple]) -> tuple[torch.Tensor, Rows]:
        """Logits for the rows step_chunks asks for, and which rows belong to whom."""
        chunks = self.step_chunks(step, proposals)
        if self.single_sequence:
            return self._execute_contiguous(chunks)
        graphs = self.decode_graphs
        if (graphs is not None and not step.prefills and not proposals
                and graphs.fits(len(step.decodes), [seq.block_tables for seq in step.decodes])):
            logits = graphs.run([(seq.block_tables, seq.num_computed) for seq in step.decodes],
                                [chunk[0] for _, _, chunk, *_ in chunks])
            return logits, {key: (i, 1) for i, (key, *_) in enumerate(chunks)}
        device = self.model.device
        tokens: list[int] = []
        decodes, prefills = [], []
        rows: Rows = {}
        logits_indices: list[int] = []
        for key, seq, chunk, is_decode, every_row, last_row, verify in chunks:
            offset, n = len(tokens), len(chunk)
            tokens.extend(chunk)
            if is_decode:
                decodes.append((seq.block_tables, seq.num_computed))
            else:
                prefills.append((seq.block_tables, seq.num_computed, n, verify))
            if every_row:
                rows[key] = (len(logits_indices), n)
                logits_indices.extend(range(offset, offset + n))
            elif last_row:
                rows[key] = (len(logits_indices), 1)
                logits_indices.append(offset + n - 1)
        batch = self._paged_batch(decodes, prefills)
        if self.encoder_decoder:
            self._encode_new_sources([seq for _, seq, *_ in chunks])
            batch.cross = build_cross_batch([(seq.block_tables[1], len(seq.encoder_ids), len(chunk))
                                             for _, seq, chunk, *_ in chunks], self.config.block_size, device)
        logits = self.model.forward_paged(torch.tensor(tokens, device=device), self.cache, batch,
                                          torch.tensor(logits_indices, dtype=torch.long, device=device))
        return logits, rows

    def _paged_batch(self, decodes: list[tuple[list[list[int]], int]],
                     prefills: list[tuple[list[list[int]], int, int, bool]]) -> PagedAttentionBatch:
        """build_paged_batch on every sequence's first block table, and for a model with windowed
        layers in a pool of their own, the same step on the second as its `windowed` batch."""
        def on_table(i: int) -> PagedAttentionBatch:
            return build_paged_batch([(tables[i], pos) for tables, pos in decodes],
                                     [(tables[i], first, n, verify) for tables, first, n, verify in prefills],
                                     self.config.block_size, self.model.device, self.per_sequence)
        batch = on_table(0)
        if self.windowed_layers:
            batch.windowed = on_table(1)
        return batch

    def _encode_new_sources(self, seqs: list[Request]) -> None:
        """Write the cross-attention keys and values of every source of the step not yet in the pool."""
        new = list({id(seq): seq for seq in seqs if id(seq) not in self.encoded}.values())
        if not new:
            return
        bs, device = self.config.block_size, self.model.device
        slots = [slot_table([seq.block_tables[1]], len(seq.encoder_ids), bs, device)[0] for seq in new]
        self.model.encode_paged([seq.encoder_ids for seq in new], slots, self.cache)
        self.encoded.update(id(seq) for seq in new)

    def _contiguous_cache(self, seq: Request) -> KVCache:
        cache = self.caches.get(seq.request_id)
        if cache is None:
            cache = self.model.new_kv_cache(1, len(seq.prompt_ids) + seq.params.max_tokens, self.config.kv_cache_dtype)
            self.caches[seq.request_id] = cache
        return cache

    def _execute_contiguous(self, chunks: list[tuple]) -> tuple[torch.Tensor, Rows]:
        device = self.model.device
        parts, rows = [], {}
        num_rows = 0
        for key, seq, tokens, _, every_row, last_row, verify in chunks:
            logits = self.model(torch.tensor([tokens], device=device), seq.num_computed, self._contiguous_cache(seq),
                                last_only=not every_row, verify=verify)[0]  # (rows, vocab)
            if every_row or last_row:
                rows[key] = (num_rows, logits.shape[0])
                parts.append(logits)
                num_rows += logits.shape[0]
        if not parts:
            return torch.empty(0), rows
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), rows

    # -- the draft model's proposals -----------------------------------------------------------
    def propose_with_draft(self, wanted: list[tuple[Request, int]]) -> dict[int, tuple]:
        """k_i proposals for each (sequence, k_i) from the draft model: one pass that catches the draft
        up on everything it has not seen (a whole prompt the first time), then one pass per further
        proposal. Returns id(seq) -> (seq, tokens, the distributions they were drawn from or None)."""
        tokens = {id(seq): [] for seq, _ in wanted}
        probs = {id(seq): [] for seq, _ in wanted}
        for j in range(max(k for _, k in wanted)):
            active = [(seq, k) for seq, k in wanted if k > j]
            if self.single_sequence:
                logits = self._draft_contiguous(active, tokens, j)
            else:
                logits = self._draft_paged(active, tokens, j)
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

    def _draft_inputs(self, seq: Request, tokens: dict, j: int) -> tuple[list[int], int]:
        """The draft's new tokens for proposal j of seq and the position of the first of them."""
        if j == 0:
            return seq.all_ids[seq.draft_computed:], seq.draft_computed
        return tokens[id(seq)][-1:], seq.num_tokens + j - 1

    def _draft_paged(self, active, tokens: dict, j: int) -> torch.Tensor:
        device = self.model.device
        ids, chunks, last_rows = [], [], []
        for seq, _ in active:
            new, first = self._draft_inputs(seq, tokens, j)
            ids.extend(new)
            chunks.append((seq.block_tables[0], first, len(new)))
            last_rows.append(len(ids) - 1)
        batch = build_paged_batch([], chunks, self.config.block_size, device)
        return self.draft.forward_paged(torch.tensor(ids, device=device), self.draft_cache, batch,
                                        torch.tensor(last_rows, dtype=torch.long, device=device))

    def _draft_contiguous(self, active, tokens: dict, j: int) -> torch.Tensor:
        device = self.draft.device
        rows = []
        for seq, _ in active:
            new, first = self._draft_inputs(seq, tokens, j)
            cache = self.draft_caches.get(seq.request_id)
            if cache is None:
                cache = self.draft.new_kv_cache(1, len(seq.prompt_ids) + seq.params.max_tokens,
                                                self.config.kv_cache_dtype)
                self.draft_caches[seq.request_id] = cache
            rows.append(self.draft(torch.tensor([new], device=device), first, cache, last_only=True)[0, -1])
        return torch.stack(rows)

