"""CUDA graphs of the pure-decode step: one per batch-size bucket, captured after the warm-up, replayed.

A decode step of B sequences is padded to the smallest bucket b >= B (`warmup.decode_buckets`): static buffers
hold the step's inputs (token ids, positions, slots, lengths, block-table rows); rows B..b-1 repeat row 0's
inputs with slot -1, so they attend over a real context and write nothing into the cache
(`kernels.rope_triton` skips negative slots); their logits are dropped. The block-table buffer is as wide as the
longest context, so its stride (a kernel argument frozen in the graph) never changes; columns past a row's
length are never read. The MLA split count is fixed per bucket at the one for the longest context (empty
splits merge to nothing), so one graph serves every context length.

A step of decodes verifying drafts runs as a decode of one row per token (step_inputs.py), so it replays the
bucket of its token count (the buckets then go up to max_num_seqs x (1 + K)); with the MTP drafter the graphs
also output every row's normed hidden state, which the layer reads (its own forwards run eagerly).

Prefill and mixed steps, batches past the largest bucket and `--enforce-eager` run eagerly. Only the Triton path
on CUDA is captured (the torch twins read host lengths); `EagerGraph` stands in for `torch.cuda.CUDAGraph` in
the CPU tests of the staging and padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from deepseek_mcp.inference.engine.warmup import bucket_for, decode_buckets
from deepseek_mcp.inference.model.attention import AttentionMetadata

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


class Graph(Protocol):
    def capture(self, fn: Callable[[], Outputs]) -> Outputs: ...

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph over one forward; the buckets share one memory pool (captured largest first)."""

    def __init__(self, pool: object | None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        """One eager run on a side stream first (compiles, tunes, lazy library init outside the capture)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        self.pool = self.graph.pool()
        return out

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """Replays by calling the forward again on the static buffers (CPU tests of the staging logic)."""

    def __init__(self, pool: object | None = None) -> None:
        self.fn: Callable[[], Outputs] | None = None
        self.out: Outputs | None = None

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        fn()  # the warm run, as CudaGraph's
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        assert self.fn is not None and self.out is not None
        with torch.inference_mode():  # the captured output is an inference tensor (the model runs in that mode)
            new = self.fn()
            for buf, value in zip(*((self.out, new) if isinstance(new, tuple) else ((self.out,), (new,)))):
                buf.copy_(value)

    @property
    def pool(self) -> None:
        return None


Forward = Callable[..., Outputs]


class DecodeGraphs:
    def __init__(self, model: Forward, kv_cache: torch.Tensor, block_size: int, max_num_seqs: int,
                 max_context: int, graph: type = CudaGraph, hidden: bool = False) -> None:
        """`max_num_seqs`: the most rows a decode step has; `hidden`: the graphs also output every row's normed
        hidden state (`model(..., all_hidden=True)`, for the MTP drafter)."""
        self.model, self.kv_cache, self.block_size, self.hidden = model, kv_cache, block_size, hidden
        self.max_context, self.graph_type = max_context, graph
        self.buckets = decode_buckets(max_num_seqs)
        n, dev = self.buckets[-1], kv_cache.device
        cols = -(-max_context // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)  # [n]
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=dev)  # [n]
        self.block_tables = torch.zeros(n, cols, dtype=torch.int32, device=dev)  # [n, max blocks per sequence]
        self.rows = torch.arange(n + 1, dtype=torch.int64, device=dev)  # query_start_loc and logits rows
        self.graphs: dict[int, Graph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [b, V] the graph's output buffer
        self.states: dict[int, torch.Tensor] = {}  # bucket -> [b, D] with `hidden`

    def meta(self, b: int) -> AttentionMetadata:
        """Static metadata of bucket b: host lengths stand at the longest context (they only pick the split
        count on the Triton path); device lengths are the buffers a step stages."""
        return AttentionMetadata(
            slot_mapping=self.slots[:b], block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b],
            query_start_loc=self.rows[: b + 1], logits_indices=self.rows[:b], block_size=self.block_size,
            seq_lens_list=(self.max_context,) * b, query_lens_list=(1,) * b, max_seq_len=self.max_context)

    def capture(self, log: Callable[[str], None] | None = None) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool); the graph runs each
        once eagerly on its buffers first."""
        pool = None
        for b in reversed(self.buckets):
            if log is not None:
                log(f"capturing CUDA graph: decode batch {b}")
            meta = self.meta(b)

            def forward(b: int = b, meta: AttentionMetadata = meta) -> Outputs:
                if self.hidden:
                    return self.model(self.input_ids[:b], self.positions[:b], meta, self.kv_cache, all_hidden=True)
                return self.model(self.input_ids[:b], self.positions[:b], meta, self.kv_cache)

            graph = self.graph_type(pool)
            out = graph.capture(forward)
            if self.hidden:
                self.logits[b], self.states[b] = out
            else:
                self.logits[b] = out
            self.graphs[b] = graph
            pool = graph.pool

    def bucket(self, meta: AttentionMetadata) -> int | None:
        """The bucket a step replays in, None for steps that run eagerly."""
        if not self.graphs or not meta.is_decode:
            return None
        return bucket_for(meta.num_seqs, self.buckets)

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, b: int) -> None:
        """Copy a decode step of B <= b sequences into the static buffers; rows B..b-1 repeat row 0, slot -1."""
        n, w = meta.num_seqs, meta.block_tables.shape[1]
        for buf, src in ((self.input_ids, input_ids), (self.positions, positions), (self.seq_lens, meta.seq_lens)):
            buf[:n].copy_(src)
            buf[n:b].copy_(src[:1].expand(b - n))
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:b].fill_(-1)
        self.block_tables[:n, :w].copy_(meta.block_tables)
        self.block_tables[n:b, :w].copy_(meta.block_tables[:1].expand(b - n, -1))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, b: int) -> torch.Tensor:
        """Replay bucket b for this decode step -> logits [B, V] fp32 (a copy: the buffer is the next step's)."""
        self.stage(input_ids, positions, meta, b)
        self.graphs[b].replay()
        return self.logits[b][: meta.num_seqs].clone()

    def run_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, b: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """`run`, and the rows' normed hidden states [B, D] (graphs captured with `hidden`; copies)."""
        logits = self.run(input_ids, positions, meta, b)
        return logits, self.states[b][: meta.num_seqs].clone()
