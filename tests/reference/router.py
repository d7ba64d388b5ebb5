"""The reference `kernels.router.moe_gate_route` is tested against: `moe_gate_route_torch`, with the same signature
as the Triton wrapper and the same input checks (the kernel module's own): the gate as one fp32 matmul, then
`kernels.router.moe_route_torch`. (`moe_route_torch` and `moe_combine_torch` stay in `kernels/router.py`: the
CPU path runs them.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_mcp.kernels.router import _check_gate, moe_route_torch
from deepseek_mcp.kernels.util import out_or_new


def moe_gate_route_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
                         top_k: int, norm_topk_prob: bool, scaling: float, *, shared_expert: bool = False,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None, split_k: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `moe_gate_route`: moe_route_torch of the fp32 logits F.linear(x.float(), w) (split_k ignored)."""
    _check_gate(x, w, bias, n_group, topk_group, top_k)
    weights, ids = moe_route_torch(F.linear(x.float(), w.float()), bias, n_group, topk_group, top_k,
                                   norm_topk_prob, scaling, shared_expert=shared_expert)
    if out is None:
        return weights, ids
    return (out_or_new(out[0], weights.shape, torch.float32, x.device, "out[0]").copy_(weights),
            out_or_new(out[1], ids.shape, torch.int64, x.device, "out[1]").copy_(ids))
