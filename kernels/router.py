"""DeepSeek-V3 MoE gate, routing and combine: `moe_gate_route` / `moe_route` / `moe_combine` (Triton,
kernels/router_triton.py, imported on first use). `moe_route_torch` / `moe_combine_torch` are the twins of the last
two (same signatures) and what the CPU path runs (inference/model/moe.py); `moe_gate_route`'s reference,
`moe_gate_route_torch`, is in tests/reference/router.py.

Gate: logits = x W^T in fp32 (x upcast; fp32 products, no tf32: the routing hangs on small differences).

Routing (noaux_tc): scores = sigmoid(logits); the bias (e_score_correction_bias) is added for the selection
only; with n_group > 1 the experts are split into groups, each group scored by the sum of its two best biased
scores, and only the topk_group best groups stay (the others masked with -inf, as DeepSeek's reference, so a
negative biased score in a kept group still wins); top_k experts of what is left; their weights are the
unbiased scores, normalized to sum 1 (norm_topk_prob) and times routed_scaling_factor.
Combine: the expert outputs sorted by expert [T*k, D] summed back into their tokens with the routing weights.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import check_launchable, check_tensor, device_sms, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _triton():
    from deepseek_mcp.kernels import router_triton

    return router_triton


def _check_route(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> None:
    check_tensor(logits, "logits", ndim=2, dtypes=(torch.float32,), last_contiguous=True)
    _check_groups(logits.shape[1], bias, logits.device, n_group, topk_group, top_k)


def _check_groups(e: int, bias: torch.Tensor, device: torch.device, n_group: int, topk_group: int, top_k: int
                  ) -> None:
    check_tensor(bias, "bias", shape=(e,), device=device)
    if n_group < 1 or e % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"{e} experts cannot form {n_group} groups with {topk_group} kept")
    if not 1 <= top_k <= e * topk_group // n_group:
        raise ValueError(f"top_k {top_k} outside 1..{e * topk_group // n_group} (experts in the kept groups)")


def moe_route_torch(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                    norm_topk_prob: bool, scaling: float, *, shared_expert: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `moe_route`: logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    _check_route(logits, bias, n_group, topk_group, top_k)
    t, e = logits.shape
    scores = logits.sigmoid()
    biased = scores + bias.float()
    if n_group > 1:
        grouped = biased.view(t, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        biased = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)
    idx = biased.topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if shared_expert:
        weights = torch.cat((weights, torch.ones_like(weights[:, :1])), dim=1)
        idx = torch.cat((idx, torch.full_like(idx[:, :1], e)), dim=1)
    return weights, idx


def moe_route(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
              norm_topk_prob: bool, scaling: float, *, shared_expert: bool = False,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole router in one launch (one program per token): logits [T, E] fp32 -> (weights [T, k] fp32,
    expert ids [T, k] int64), best first. shared_expert: one more column, expert E with weight 1 (the shared
    expert stacked after the routed ones)."""
    _check_route(logits, bias, n_group, topk_group, top_k)
    check_launchable(logits.device, "moe_route")
    t, cols = logits.shape[0], top_k + int(shared_expert)
    weights = out_or_new(None if out is None else out[0], (t, cols), torch.float32, logits.device, "out[0]")
    ids = out_or_new(None if out is None else out[1], (t, cols), torch.int64, logits.device, "out[1]")
    if t:
        _triton().launch_moe_route(logits, bias, weights, ids, n_group, topk_group, top_k, norm_topk_prob, scaling,
                                   shared_expert)
    return weights, ids


def _check_gate(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int
                ) -> None:
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    check_tensor(w, "w", ndim=2, dtypes=(torch.float32,), device=x.device, last_contiguous=True)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"x [T, D] = {tuple(x.shape)} and w [E, D] = {tuple(w.shape)} disagree on D")
    _check_groups(w.shape[0], bias, x.device, n_group, topk_group, top_k)


def moe_gate_route(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
                   top_k: int, norm_topk_prob: bool, scaling: float, *, shared_expert: bool = False,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None, split_k: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and router in two launches: x [T, D] (bf16/fp16/fp32), w [E, D] fp32 -> (weights [T, k(+1)]
    fp32, ids [T, k(+1)] int64) as `moe_route` of x W^T. Launch 1 (router_gemm) writes split-K fp32 partial
    logits [S, T, E]; launch 2 (moe_route) sums them in order and routes. split_k: S, by default chosen from
    the shapes (router_triton.router_split_k) so a decode batch spreads the weight read over the SMs."""
    _check_gate(x, w, bias, n_group, topk_group, top_k)
    check_launchable(x.device, "moe_gate_route")
    t, cols = x.shape[0], top_k + int(shared_expert)
    weights = out_or_new(None if out is None else out[0], (t, cols), torch.float32, x.device, "out[0]")
    ids = out_or_new(None if out is None else out[1], (t, cols), torch.int64, x.device, "out[1]")
    if t == 0:
        return weights, ids
    k = _triton()
    e, d = w.shape
    if split_k is None:
        split, per_split = k.router_split_k(t, d, e, device_sms(x.device))
    else:
        steps = max(1, -(-d // k.GEMM_BLOCK_K))
        if not 1 <= split_k <= steps:
            raise ValueError(f"split_k {split_k} outside 1..{steps} (K steps of {k.GEMM_BLOCK_K})")
        per_split = -(-steps // split_k)
        split = -(-steps // per_split)
    parts = k.launch_router_gemm(x, w, split, per_split)  # [S, T, E]
    k.launch_moe_route(parts, bias, weights, ids, n_group, topk_group, top_k, norm_topk_prob, scaling,
                       shared_expert)
    return weights, ids


def _check_combine(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor | None,
                   inv: torch.Tensor | None, valid_rows: torch.Tensor | None) -> None:
    check_tensor(ys, "ys", ndim=2, dtypes=(torch.bfloat16, torch.float16, torch.float32), last_contiguous=True)
    check_tensor(weights, "weights", ndim=2, dtypes=(torch.float32,), device=ys.device)
    if order is None and inv is None:
        raise ValueError("moe_combine needs order (sorted row -> pair) or inv (pair -> sorted row)")
    for name, perm in (("order", order), ("inv", inv)):
        if perm is not None:
            check_tensor(perm, name, shape=(weights.numel(),), dtypes=(torch.int32, torch.int64), device=ys.device)
    if valid_rows is not None:
        check_tensor(valid_rows, "valid_rows", shape=(1,), dtypes=(torch.int32, torch.int64), device=ys.device)
    if ys.shape[0] != weights.numel():
        raise ValueError(f"ys has {ys.shape[0]} rows for {weights.numel()} (token, expert) pairs")


def moe_combine_torch(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor | None, *,
                      out: torch.Tensor | None = None, inv: torch.Tensor | None = None,
                      valid_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `moe_combine` (valid_rows compared on the device too: no host read)."""
    _check_combine(ys, weights, order, inv, valid_rows)
    t, k = weights.shape
    if inv is not None:  # gather each token's k rows
        rows = ys.float()[inv.long()]  # [T*k, D] in pair order
        if valid_rows is not None:  # where, not a multiply: skipped rows may hold NaN
            rows = torch.where((inv < valid_rows)[:, None], rows, 0.0)
        y = (rows.view(t, k, -1) * weights[:, :, None]).sum(1).to(ys.dtype)
    else:
        scaled = ys.float() * weights.flatten()[order, None]  # [T*k, D]
        if valid_rows is not None:
            live = torch.arange(ys.shape[0], device=ys.device) < valid_rows  # [T*k] sorted rows kept
            scaled = torch.where(live[:, None], scaled, 0.0)
        acc = torch.zeros(t, ys.shape[1], dtype=torch.float32, device=ys.device)
        y = acc.index_add_(0, order // k, scaled).to(ys.dtype)
    return y if out is None else out_or_new(out, y.shape, ys.dtype, ys.device).copy_(y)


def moe_combine(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor | None, *,
                out: torch.Tensor | None = None, inv: torch.Tensor | None = None,
                valid_rows: torch.Tensor | None = None) -> torch.Tensor:
    """ys [T*k, D]: row r is the output of pair order[r] = t * k + j (token t's j-th expert), rows sorted by
    expert; weights [T, k] fp32 -> [T, D] in ys' dtype, sum_j weights[t, j] * that pair's row, in fp32.
    inv [T*k] (pair -> its sorted row, the inverse permutation of order): given, it is used as it is (no
    argsort launch; order may be None). valid_rows [1] int on ys' device (e.g. moe_align's offsets[-1:]): sorted
    rows r >= valid_rows[0] are skipped, never read (they may hold garbage or NaN), so a token whose rows are
    all skipped gets exactly 0; the kernel loads the limit itself, no host read."""
    _check_combine(ys, weights, order, inv, valid_rows)
    check_launchable(ys.device, "moe_combine")
    t, k = weights.shape
    out = out_or_new(out, (t, ys.shape[1]), ys.dtype, ys.device)
    if out.numel():
        if inv is None:
            inv = order.argsort()  # [T*k] pair -> its sorted row (order is a permutation)
        _triton().launch_moe_combine(ys, weights.contiguous(), inv, out, valid_rows)
    return out
