"""How the model splits over a tensor-parallel group: this rank's place in it, the slice of a checkpoint tensor a
parameter holds, and the sizes that must divide.

Every layer is built for a `TPContext` (world size 1, rank 0 by default: the single-device model is the same
model) and allocates only its part (DeepSeek's reference split of V3, with the experts split as vLLM does):
- attention heads: `q_proj`/`q_b_proj` and `kv_b_proj` column-parallel by head, `o_proj` row-parallel +
  all-reduce; `q_a_proj`, `kv_a_proj_with_mqa` and the norms replicated, so every rank holds the full latent
  cache;
- dense MLPs: gate/up column-parallel, down row-parallel + all-reduce;
- MoE: every rank routes all tokens and holds every routed expert and the shared expert split along their
  intermediate size (gate/up rows, down columns), so the shared expert keeps the routed experts' shape on every
  rank and is stacked as expert E there too; one all-reduce sums the layer's partial outputs. At batch 1 every
  rank reads 1/N of each active expert (an index-range split would leave the rank holding two of the token's
  experts reading twice the bytes of the rest);
- embedding vocabulary-parallel (vocabulary padded to a multiple of N; masked lookup + all-reduce), `lm_head`
  column-parallel with the logits gathered on rank 0.
A split parameter carries a `Shard` saying which slice of the checkpoint tensor it holds; the loader
(`checkpoint.load_weights`) reads exactly that slice. The process group is passed in, never global, and every
collective the forward runs goes through `TPContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deepseek_mcp.inference.model.config import ModelConfig


class ParallelConfigError(ValueError):
    """A model whose sizes cannot be split over the requested number of ranks; the message names them."""


@dataclass(frozen=True)
class TPContext:
    """This rank's place in the tensor-parallel group whose collectives the forward runs."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup (NCCL on CUDA, gloo on CPU); None = the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x (same shape), in rank order, on rank 0 of the group; None elsewhere."""
        if self.world_size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dst = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.gather(x, parts, dst=dst, group=self.group)
        return parts


ONE_DEVICE = TPContext()  # frozen: the default every layer is built for


@dataclass(frozen=True)
class Shard:
    """The slice [start, start + size) along `dim` (of length `full` in the checkpoint) of the checkpoint tensor
    that a parameter holds (for stacked experts: of each expert's tensor). Rows past `size` (vocabulary padding)
    stay zero. `dequant_block` > 0: an FP8 slice that cuts a scale block, held dequantized (exactly, in fp32
    then the activation dtype) with its scales sliced from that block."""

    dim: int
    start: int
    size: int
    full: int
    dequant_block: int = 0


def split(full: int, tp: TPContext, dim: int, fp8: bool, block: int) -> tuple[Shard, bool]:
    """This rank's equal slice of a dimension of length `full`, and whether it stays FP8 (False where the
    slice cuts a `block`-sized scale block: it is then held dequantized)."""
    n = full // tp.world_size
    start, end = tp.rank * n, tp.rank * n + n
    cut = fp8 and (start % block != 0 or (end % block != 0 and end != full))
    return Shard(dim, start, n, full, block if cut else 0), fp8 and not cut


def scale_shard(shard: Shard, block: int) -> Shard:
    """The scale blocks of an FP8 slice aligned to them."""
    return Shard(shard.dim, shard.start // block, -(-shard.size // block), -(-shard.full // block))


def check_divisible(cfg: ModelConfig, world_size: int) -> None:
    """Refuse, before anything is loaded, sizes that do not split (the vocabulary is padded instead)."""
    sizes = {"num_attention_heads": cfg.num_heads}
    if cfg.first_k_dense_replace > 0 or not cfg.n_routed_experts:  # some layer is dense
        sizes["intermediate_size"] = cfg.intermediate_size
    if cfg.n_routed_experts:
        sizes["moe_intermediate_size"] = cfg.moe_intermediate_size
    bad = [f"{k} = {v}" for k, v in sizes.items() if v % world_size]
    if bad:
        raise ParallelConfigError(f"tensor-parallel size {world_size} does not divide {', '.join(bad)}; choose a "
                                  "size that divides them all")


def padded_vocab(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size
