"""Runs forward steps of a model over its paged latent cache: the piece the scheduler drives."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.cuda_graphs import DecodeGraphs
from deepseek_mcp.inference.engine.step_inputs import StepInputs
from deepseek_mcp.inference.engine.warmup import warm_steps, warm_up
from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.transformer import Transformer
from deepseek_mcp.inference.resources import available_memory, default_cache_dir


class CacheMemoryError(MemoryError):
    """The requested cache pool cannot fit; raised before anything large is allocated."""


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, mtp: bool = False) -> int:
    """(kv_lora_rank + qk_rope_head_dim) x layers (+ the MTP layer's) x element size: nothing per head."""
    return cfg.kv_cache_dim * (cfg.num_layers + mtp) * torch.empty((), dtype=dtype).element_size()


def check_cache_fits(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                     device: torch.device, setting: str = "cache_tokens", mtp: bool = False) -> None:
    need = num_blocks * block_size * cache_bytes_per_token(cfg, dtype, mtp)
    have = available_memory(device)
    if need > 0.9 * have:
        raise CacheMemoryError(
            f"a KV cache of {num_blocks * block_size} tokens needs {need / 2**30:.2f} GiB on {device}, but only "
            f"{have / 2**30:.2f} GiB is available; lower the `{setting}` setting")


class ModelRunner:
    """Owns the cache pool `[num_layers (+ 1: the MTP layer's), num_blocks, block_size, kv_lora_rank +
    qk_rope_head_dim]`. With the model's multi-token-prediction layer it also runs its drafting forwards (`draft`),
    which read the hidden states of the last step (`run(..., keep_hidden=True)`) or of the last draft."""

    def __init__(self, model: Transformer, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype, setting: str = "cache_tokens"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.model, self.config = model, config
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device, self.dtype = torch.device(device), dtype
        self.has_mtp = getattr(model, "mtp", None) is not None
        check_cache_fits(config, num_blocks, block_size, dtype, self.device, setting, self.has_mtp)
        self.kv_cache = torch.zeros(config.num_layers + self.has_mtp, num_blocks, block_size, config.kv_cache_dim,
                                    dtype=dtype, device=self.device)
        self.inputs = StepInputs(num_blocks, block_size, self.device)  # persistent block table, staged inputs
        self.graphs: DecodeGraphs | None = None  # set by warm_up on CUDA unless enforce_eager
        self.hidden: torch.Tensor | None = None  # [T, D] every new token's normed state, last run(keep_hidden)
        self.draft_hidden: torch.Tensor | None = None  # [N, D] the MTP layer's normed states, last draft()

    @property
    def cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def run(self, seqs: Sequence[ScheduledSeq], all_logits: bool = False, keep_hidden: bool = False
            ) -> torch.Tensor:
        """Compute the new tokens of every sequence; logits [B, V] float32 of each one's last token
        (or [T, V] for every new token with all_logits). `keep_hidden`: every new token's normed state is kept
        in `self.hidden` [T, D] for the MTP layer (the decode CUDA graphs output them too when the model has
        the layer)."""
        input_ids, positions, meta = self.inputs.build(seqs, all_logits)  # block ids checked as they arrive
        bucket = None if self.graphs is None or all_logits else self.graphs.bucket(meta)
        if keep_hidden:
            if bucket is not None and self.graphs.hidden:  # a pure-decode (or verify) step: replay its graph
                logits, self.hidden = self.graphs.run_hidden(input_ids, positions, meta, bucket)
            else:
                logits, self.hidden = self.model(input_ids, positions, meta, self.kv_cache, all_hidden=True)
            return logits
        if bucket is not None:  # a pure-decode step: replay the bucket's CUDA graph
            return self.graphs.run(input_ids, positions, meta, bucket)
        return self.model(input_ids, positions, meta, self.kv_cache)

    def draft(self, seqs: Sequence[ScheduledSeq], hidden_rows: Sequence[int], chained: bool = False
              ) -> torch.Tensor:
        """One forward of the MTP layer: `seqs` give, per sequence, the tokens at t + 1 for positions t from
        `start_pos` (its latent cache written at t), `hidden_rows` the row of each new token's state at t in
        `self.hidden` (or, `chained`, in the last draft's `self.draft_hidden`). Returns logits [B, V] float32 of
        each sequence's last row (the token at t + 2); its states are kept for a chained draft."""
        if not self.has_mtp:
            raise RuntimeError("this model was loaded without its multi-token-prediction layer")
        source = self.draft_hidden if chained else self.hidden
        if source is None:
            raise RuntimeError("draft() needs the states of a run(keep_hidden=True) (or of a draft, chained)")
        input_ids, positions, meta = self.inputs.build(seqs)
        if len(hidden_rows) != len(input_ids):
            raise ValueError(f"{len(hidden_rows)} hidden rows for {len(input_ids)} draft tokens")
        hidden = source[torch.tensor(hidden_rows, dtype=torch.int64).to(source.device, non_blocking=True)]
        logits, self.draft_hidden = self.model.draft(input_ids, positions, hidden, meta, self.kv_cache)
        return logits

    def warms(self, force: bool | None) -> bool:
        """Whether `warm_up(force=force)` does anything: by default only on the Triton path on CUDA."""
        on_gpu = self.model.rt.kernels == "triton" and self.device.type == "cuda"
        return force is True or (force is None and on_gpu)

    @property
    def graph_count(self) -> int:
        """Decode CUDA graphs captured (0 before warm_up or with enforce_eager)."""
        return 0 if self.graphs is None else len(self.graphs.graphs)

    def warm_up(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_context: int,
                enforce_eager: bool = False, force: bool | None = None,
                log: Callable[[str], None] | None = None, graph: type | None = None) -> None:
        """Compile and tune every Triton kernel for the shapes this pool will serve (inference/engine/warmup.py),
        then capture the decode CUDA graphs unless `enforce_eager`. By default only on the Triton path on CUDA
        (on CPU the twins compile nothing and the interpreter nothing worth it); `force` True / False overrides.
        `graph` (tests) replaces torch.cuda.CUDAGraph, e.g. by cuda_graphs.EagerGraph."""
        if not self.warms(force):
            return
        on_gpu = self.model.rt.kernels == "triton" and self.device.type == "cuda"
        graphs = not enforce_eager and (graph is not None or on_gpu)
        if self.model.rt.kernels == "triton":
            from deepseek_mcp.kernels.platform import use_user_cache
            from deepseek_mcp.kernels.util import device_sms

            use_user_cache(default_cache_dir())
            heads = next(m.w_uk.shape[0] for m in self.model.modules() if hasattr(m, "w_uk"))  # heads of this rank
            steps = warm_steps(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                               max_context=max_context, block_size=self.block_size, heads=heads,
                               sms=device_sms(self.device), decode=not graphs)
            with torch.inference_mode():
                warm_up(self.run, steps, log)
        if not graphs:
            return
        decode = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_num_seqs, max_context,
                              hidden=self.has_mtp, **({} if graph is None else {"graph": graph}))
        with torch.inference_mode():
            decode.capture(log)
        self.graphs = decode
