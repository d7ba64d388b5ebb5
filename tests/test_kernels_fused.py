"""Fused kernels of the decode step against float64 references: RMSNorm (+ residual add, + FP8 quantization of
its output), the DeepSeek gate GEMM and router, the MoE combine. Triton interpreter at small shapes without
CUDA; outputs are NaN-poisoned so an unwritten element fails. Tolerances: fp32 math against float64, 1e-5
relative for fp32 inputs, 1 bf16 ulp (2^-7) for bf16; the quantized norm output bit-exact against act_quant.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
from reference.fp8 import act_quant_torch, ceil_pow2_torch  # noqa: E402
from reference.mla import mla_prefill_naive_torch  # noqa: E402
from reference.norm import rmsnorm_residual_torch, rmsnorm_torch  # noqa: E402
from reference.router import moe_gate_route_torch  # noqa: E402

from deepseek_mcp.kernels.fp8 import act_quant  # noqa: E402
from deepseek_mcp.kernels.moe_align import moe_align_torch  # noqa: E402
from deepseek_mcp.kernels.norm import rmsnorm, rmsnorm_residual  # noqa: E402
from deepseek_mcp.kernels.platform import triton_available  # noqa: E402
from deepseek_mcp.kernels.router import (  # noqa: E402
    moe_combine,
    moe_combine_torch,
    moe_gate_route,
    moe_route,
    moe_route_torch,
)
from deepseek_mcp.kernels.util import FP8_DTYPE, cdiv  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _norm64(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("d", [64, 200])
def test_rmsnorm_with_and_without_residual(dtype, rtol, d):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(5, d, generator=g) * 3).to(dtype).to(DEV)
    res = torch.randn(5, d, generator=g).to(dtype).to(DEV)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    nan = torch.full_like(x, float("nan"))
    y = rmsnorm(x, w, 1e-6, out=nan.clone())
    ref = _norm64(x, w, 1e-6)
    assert not y.isnan().any() and ((y.double() - ref).abs() <= rtol * ref.abs().max() * 2).all()
    assert torch.allclose(rmsnorm_torch(x, w, 1e-6).double(), ref, atol=2 * rtol * ref.abs().max().item())
    y2, h = rmsnorm_residual(x, res, w, 1e-6, out=(nan.clone(), nan.clone()))
    if DEV.type == "cuda" or dtype == torch.float32:
        assert torch.equal(h, x + res)  # the add rounds to the activation dtype, as a separate add does
    else:  # the interpreter's fp32 -> bf16 cast does not round to nearest: within one ulp
        assert ((h.float() - (x + res).float()).abs() <= 2**-7 * (x + res).float().abs()).all()
    ref2 = _norm64(x + res, w, 1e-6)
    assert not y2.isnan().any() and ((y2.double() - ref2).abs() <= 2 * rtol * ref2.abs().max()).all()
    t2, th = rmsnorm_residual_torch(x, res, w, 1e-6)
    assert torch.equal(th, x + res) and ((t2.double() - ref2).abs() <= 2 * rtol * ref2.abs().max()).all()


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 300, 512])  # D < 128, one group, a partial last group, several groups
def test_rmsnorm_quant_is_act_quant_of_its_output(residual, scale_fmt, dtype, d):
    g = torch.Generator().manual_seed(d + 7 * residual)
    x = (torch.randn(6, d, generator=g) * torch.logspace(-3, 2, d)).to(dtype).to(DEV)  # groups of unlike sizes
    x[1] = 0  # an all-zero row: every scale from the 1e-4 floor
    res = torch.randn(6, d, generator=g).to(dtype).to(DEV)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    kb = -(-d // 128)
    poison = (torch.full((6, d), float("nan"), dtype=dtype, device=DEV), torch.full_like(x, float("nan")),
              torch.full((6, d), float("nan"), dtype=FP8_DTYPE, device=DEV),
              torch.full((6, kb), float("nan"), device=DEV))
    if residual:
        res[1] = -x[1]
        y, h, yq, ys = rmsnorm_residual(x, res, w, 1e-6, out=poison, quant=True, scale_fmt=scale_fmt)
        plain, plain_h = rmsnorm_residual(x, res, w, 1e-6)
        assert torch.equal(h, plain_h)
        ty, th, tq, ts = rmsnorm_residual_torch(x, res, w, 1e-6, quant=True, scale_fmt=scale_fmt)
        assert torch.equal(th, x + res)
    else:
        y, yq, ys = rmsnorm(x, w, 1e-6, out=(poison[0], *poison[2:]), quant=True, scale_fmt=scale_fmt)
        plain = rmsnorm(x, w, 1e-6)
        ty, tq, ts = rmsnorm_torch(x, w, 1e-6, quant=True, scale_fmt=scale_fmt)
    assert y.data_ptr() == poison[0].data_ptr() and yq.data_ptr() == poison[2].data_ptr()
    assert torch.equal(y, plain)  # y is still written, and the same with or without quant
    rq, rs = act_quant(y, 128, scale_fmt)  # what the GEMM after the norm would have launched
    assert yq.shape == (6, d) and ys.shape == (6, kb)
    assert torch.equal(ys, rs) and torch.equal(yq.view(torch.uint8), rq.view(torch.uint8))
    tq2, ts2 = act_quant_torch(ty, 128, scale_fmt)  # the twin is rmsnorm_torch + act_quant_torch
    assert torch.equal(ts, ts2) and torch.equal(tq.view(torch.uint8), tq2.view(torch.uint8))
    floor = torch.full((kb,), 1e-4) / 448  # the all-zero row's scales
    assert torch.equal(ys[1].cpu(), ceil_pow2_torch(floor) if scale_fmt else floor)
    if scale_fmt == "ue8m0":
        assert torch.equal(ys.log2(), ys.log2().round())


def test_rmsnorm_quant_rejects_bad_arguments():
    x, w = torch.ones(2, 64, device=DEV), torch.ones(64, device=DEV)
    with pytest.raises(ValueError, match="scale_fmt"):
        rmsnorm(x, w, 1e-6, quant=True, scale_fmt="e5m2")
    with pytest.raises(ValueError, match="tuple of 3"):
        rmsnorm(x, w, 1e-6, quant=True, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="tuple of 4"):
        rmsnorm_residual(x, x, w, 1e-6, quant=True, out=(torch.empty_like(x), torch.empty_like(x)))
    with pytest.raises(ValueError, match=r"out\[2\] has dtype"):
        rmsnorm_residual(x, x, w, 1e-6, quant=True, out=(x.clone(), x.clone(), x.clone(), x[:, :1].clone()))


def _route64(logits, bias, n_group, topk_group, k, norm, scaling):
    """float64 reference written from the definition, one token at a time."""
    out_w, out_i = [], []
    for row in logits.double():
        s = torch.sigmoid(row)
        b = s + bias.double()
        e = row.numel()
        groups = b.view(n_group, e // n_group)
        gs = groups.sort(descending=True).values[:, :2].sum(-1) if n_group > 1 else torch.zeros(1)
        kept = gs.argsort(descending=True)[:topk_group].tolist() if n_group > 1 else [0]
        cand = [i for i in range(e) if i // (e // n_group) in kept]
        ids = sorted(cand, key=lambda i: -b[i].item())[:k]
        w = s[ids]
        if norm:
            w = w / w.sum()
        out_w.append(w * scaling)
        out_i.append(ids)
    return torch.stack(out_w), torch.tensor(out_i)


@pytest.mark.parametrize("e,n_group,topk_group,k,norm", [(8, 1, 1, 2, True), (16, 4, 2, 4, True),
                                                           (32, 8, 3, 6, False), (12, 3, 2, 3, True)])
def test_moe_route(e, n_group, topk_group, k, norm):
    g = torch.Generator().manual_seed(e + k)
    logits = torch.randn(7, e, generator=g).to(DEV)
    bias = (0.3 * torch.randn(e, generator=g)).to(DEV)
    bias[0] = -5.0  # a negative biased score in a kept group still beats the masked groups
    ref_w, ref_i = _route64(logits.cpu(), bias.cpu(), n_group, topk_group, k, norm, 2.5)
    nan = (torch.full((7, k), float("nan"), device=DEV), torch.full((7, k), -1, dtype=torch.int64, device=DEV))
    w, i = moe_route(logits, bias, n_group, topk_group, k, norm, 2.5, out=nan)
    assert torch.equal(i.cpu(), ref_i)
    assert torch.allclose(w.double().cpu(), ref_w, rtol=1e-5, atol=1e-6)
    tw, ti = moe_route_torch(logits, bias, n_group, topk_group, k, norm, 2.5)
    assert torch.equal(ti.cpu(), ref_i) and torch.allclose(tw.double().cpu(), ref_w, rtol=1e-5, atol=1e-6)


def test_moe_route_with_the_shared_expert_stacked():
    g = torch.Generator().manual_seed(9)
    logits, bias = torch.randn(4, 16, generator=g).to(DEV), torch.zeros(16, device=DEV)
    w, i = moe_route(logits, bias, 4, 2, 3, True, 2.5, shared_expert=True)
    tw, ti = moe_route_torch(logits, bias, 4, 2, 3, True, 2.5, shared_expert=True)
    assert i.shape == (4, 4) and (i[:, 3] == 16).all() and (w[:, 3] == 1).all()
    assert torch.equal(i, ti) and torch.allclose(w, tw, rtol=1e-6)
    plain_w, plain_i = moe_route(logits, bias, 4, 2, 3, True, 2.5)
    assert torch.equal(i[:, :3], plain_i) and torch.allclose(w[:, :3], plain_w)


def test_moe_route_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        moe_route_torch(torch.zeros(2, 10), torch.zeros(10), 3, 1, 2, True, 1.0)


# (T, D, E, n_group, topk_group, k, split_k, x dtype): T=1; D not a multiple of the 64-wide K step; split_k
# forced (3 and 2, the last split short) or chosen (S=2 at D 520; S=28 at DeepSeek-V3's D 7168, E 256)
GATE_CASES = [(1, 200, 16, 4, 2, 4, None, torch.bfloat16), (7, 300, 32, 8, 3, 6, 3, torch.float32),
              (20, 130, 12, 3, 2, 3, 2, torch.float16), (65, 520, 16, 1, 1, 2, None, torch.bfloat16),
              (3, 7168, 256, 8, 4, 8, None, torch.bfloat16)]


@pytest.mark.parametrize("t,d,e,n_group,topk_group,k,split_k,dtype", GATE_CASES)
def test_moe_gate_route(t, d, e, n_group, topk_group, k, split_k, dtype):
    from deepseek_mcp.kernels.router_triton import launch_router_gemm, router_split_k

    g = torch.Generator().manual_seed(t * d + e)
    x = torch.randn(t, d, generator=g).to(dtype).to(DEV)
    w = (torch.randn(e, d, generator=g) / d**0.5).to(DEV)
    bias = (0.1 * torch.randn(e, generator=g)).to(DEV)
    logits64 = x.double() @ w.double().T
    split, per_split = router_split_k(t, d, e, 132) if split_k is None else (split_k, cdiv(cdiv(d, 64), split_k))
    parts = launch_router_gemm(x, w, split, per_split)  # [S, T, E] fp32, ieee products: far inside tf32's 2^-11
    assert parts.shape == (split, t, e) and (split > 1 or split_k is None)
    bound = 2e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((parts.double().sum(0) - logits64).abs() <= bound).all()
    ref_w, ref_i = _route64(logits64.cpu(), bias.cpu(), n_group, topk_group, k, True, 2.5)
    for shared in (False, True):
        cols = k + shared
        poison = (torch.full((t, cols), float("nan"), device=DEV), torch.full((t, cols), -1, device=DEV))
        got_w, got_i = moe_gate_route(x, w, bias, n_group, topk_group, k, True, 2.5, shared_expert=shared,
                                      out=poison, split_k=split_k)
        assert got_w.data_ptr() == poison[0].data_ptr()
        tw, ti = moe_gate_route_torch(x, w, bias, n_group, topk_group, k, True, 2.5, shared_expert=shared)
        assert torch.equal(got_i, ti) and torch.equal(got_i[:, :k].cpu(), ref_i)  # no near-ties at these seeds
        assert torch.allclose(got_w[:, :k].double().cpu(), ref_w, rtol=1e-5, atol=1e-7)
        assert torch.allclose(tw[:, :k].double().cpu(), ref_w, rtol=1e-5, atol=1e-7)
        if shared:
            assert (got_i[:, k] == e).all() and (got_w[:, k] == 1).all()
    again = moe_gate_route(x, w, bias, n_group, topk_group, k, True, 2.5, split_k=split_k)
    assert torch.equal(again[0], got_w[:, :k]) and torch.equal(again[1], got_i[:, :k])  # deterministic


def test_router_split_k_spreads_a_decode_batch():
    from deepseek_mcp.kernels.router_triton import GEMM_BLOCK_K, gemm_block_t, router_split_k

    for t in (1, 8, 64, 65, 512, 4096):
        split, per_split = router_split_k(t, 7168, 256, 132)
        steps = 7168 // GEMM_BLOCK_K
        assert (split - 1) * per_split < steps <= split * per_split  # every split has work, all K covered
        programs = -(-t // gemm_block_t(t)) * 4 * split
        assert programs > 100 and (t < 4096 or split == 1), (t, split)
    assert router_split_k(1, 200, 16, 132) == (1, 4)  # too few K steps to split


def test_moe_gate_route_rejects_bad_inputs():
    x, w, bias = torch.zeros(2, 64, device=DEV), torch.zeros(16, 64, device=DEV), torch.zeros(16, device=DEV)
    with pytest.raises(ValueError, match="w has dtype bfloat16"):
        moe_gate_route(x, w.bfloat16(), bias, 4, 2, 2, True, 1.0)
    with pytest.raises(ValueError, match="disagree on D"):
        moe_gate_route(x[:, :32], w, bias, 4, 2, 2, True, 1.0)
    with pytest.raises(ValueError, match="bias has shape"):
        moe_gate_route_torch(x, w, bias[:8], 4, 2, 2, True, 1.0)
    with pytest.raises(ValueError, match="groups"):
        moe_gate_route(x, w, bias, 3, 2, 2, True, 1.0)
    with pytest.raises(ValueError, match="split_k 2 outside 1..1"):
        moe_gate_route(x, w, bias, 4, 2, 2, True, 1.0, split_k=2)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        moe_gate_route(x[None], w, bias, 4, 2, 2, True, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_combine(dtype):
    g = torch.Generator().manual_seed(2)
    t, k, d = 6, 3, 40
    ids = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(t)])
    order = ids.flatten().argsort(stable=True)
    ys = torch.randn(t * k, d, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g)
    ref = torch.zeros(t, d, dtype=torch.float64)
    for r, pair in enumerate(order.tolist()):
        ref[pair // k] += w[pair // k, pair % k].double() * ys[r].double()
    out = moe_combine(ys.to(DEV), w.to(DEV), order.to(DEV), out=torch.full((t, d), float("nan"), dtype=dtype,
                                                                          device=DEV))
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert not out.isnan().any() and ((out.double().cpu() - ref).abs() <= tol * ref.abs().max()).all()
    twin = moe_combine_torch(ys, w, order)
    assert ((twin.double() - ref).abs() <= tol * ref.abs().max()).all()
    for inv in (order.argsort(), order.argsort().int()):  # precomputed inverse: no argsort, order not needed
        got = moe_combine(ys.to(DEV), w.to(DEV), None, inv=inv.to(DEV),
                          out=torch.full((t, d), float("nan"), dtype=dtype, device=DEV))
        assert torch.equal(got.cpu(), out.cpu())  # the same launch on the same rows
        twin_inv = moe_combine_torch(ys, w, None, inv=inv)
        assert ((twin_inv.double() - ref).abs() <= tol * ref.abs().max()).all()
    with pytest.raises(ValueError, match="order .* or inv"):
        moe_combine(ys.to(DEV), w.to(DEV), None)
    with pytest.raises(ValueError, match="inv has shape"):
        moe_combine_torch(ys, w, None, inv=order[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_combine_skips_rows_past_valid_rows(dtype):
    """Rows from valid_rows[0] on (other ranks' experts, left unwritten by the grouped GEMM) are NaN here: never
    read, they add nothing; token 0 has no row before the limit and must come out exactly 0."""
    g = torch.Generator().manual_seed(3)
    t, k, d, e = 5, 3, 40, 6
    ids = torch.randint(-3, e + 3, (t, k), generator=g)
    ids[0] = torch.tensor([-1, e, -(2**40)])  # all foreign
    ids[1, 0] = 2  # some rows in range
    offsets, order, inv = moe_align_torch(ids, e)
    n = int(offsets[-1])
    assert 0 < n < t * k
    ys = torch.randn(t * k, d, generator=g).to(dtype)
    ys[n:] = float("nan")
    w = torch.rand(t, k, generator=g)
    ref = torch.zeros(t, d, dtype=torch.float64)
    for pair, r in enumerate(inv.tolist()):
        if r < n:
            ref[pair // k] += w[pair // k, pair % k].double() * ys[r].double()
    tol = (1e-5 if dtype == torch.float32 else 2**-7) * ref.abs().max()
    for valid in (offsets[-1:], offsets[-1:].long()):
        for o, i in ((order, None), (None, inv), (order, inv.long())):
            got = moe_combine(ys.to(DEV), w.to(DEV), None if o is None else o.to(DEV),
                              inv=None if i is None else i.to(DEV), valid_rows=valid.to(DEV),
                              out=torch.full((t, d), float("nan"), dtype=dtype, device=DEV)).cpu()
            twin = moe_combine_torch(ys, w, o, inv=i, valid_rows=valid)
            for y in (got, twin):
                assert not y.isnan().any() and ((y.double() - ref).abs() <= tol).all()
                assert torch.equal(y[0], torch.zeros(d, dtype=dtype))
    full = torch.tensor([t * k], dtype=torch.int32)  # no row skipped: the same as without a limit
    ys_all = torch.randn(t * k, d, generator=g).to(dtype)
    assert torch.equal(moe_combine(ys_all.to(DEV), w.to(DEV), None, inv=inv.to(DEV), valid_rows=full.to(DEV)).cpu(),
                       moe_combine(ys_all.to(DEV), w.to(DEV), None, inv=inv.to(DEV)).cpu())
    with pytest.raises(ValueError, match="valid_rows has shape"):
        moe_combine_torch(ys, w, order, valid_rows=offsets[-2:])
    with pytest.raises(ValueError, match="valid_rows"):
        moe_combine(ys.to(DEV), w.to(DEV), order.to(DEV), valid_rows=offsets[-1:].float().to(DEV))


def _rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    x = x.double()
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    c, s = cos.double().view(shape), sin.double().view(shape)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_rope_kv_cache(interleave, dtype, rtol):
    from deepseek_mcp.kernels.rope import rope_kv_cache, rope_kv_cache_torch

    g = torch.Generator().manual_seed(5)
    t, h, c, r = 5, 3, 24, 8
    qkv = torch.randn(t, 40 + c + r, generator=g).to(dtype)  # kv as a strided slice of a fused projection
    kv = qkv[:, 40:]
    q = torch.randn(t, h, 16 + r, generator=g).to(dtype)
    q_pe = q[..., 16:]  # strided, as split from q
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(dtype)
    freqs = torch.rand(t, r // 2, generator=g) * 6
    cos, sin = freqs.cos() * 1.2, freqs.sin() * 1.2
    slots = torch.tensor([9, 2, 14, 0, 7])
    ref_q = _rope64(q_pe, cos, sin, interleave)
    ref_row = torch.cat((_norm64(kv[:, :c], w, 1e-6), _rope64(kv[:, c:], cos, sin, interleave)), dim=-1)
    for fn in (rope_kv_cache, rope_kv_cache_torch):
        cache = torch.full((16, c + r), float("nan"), dtype=dtype)
        args = [a.to(DEV) for a in (kv, w, q_pe, cos, sin, slots, cache)]
        got_q = fn(*args, 1e-6, interleave, out=torch.full(q_pe.shape, float("nan"), dtype=dtype, device=DEV))
        cache = args[6].cpu()
        assert not got_q.isnan().any() and ((got_q.double().cpu() - ref_q).abs() <= 2 * rtol * ref_q.abs().max()).all()
        rows = cache[slots].double()
        assert ((rows - ref_row).abs() <= 2 * rtol * ref_row.abs().max()).all(), fn.__name__
        others = torch.ones(16, dtype=torch.bool)
        others[slots] = False
        assert cache[others].isnan().all()  # no other slot written


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_mla_prefill_naive(dtype, rtol):
    from deepseek_mcp.kernels.mla_naive import mla_prefill_naive

    g = torch.Generator().manual_seed(7)
    h, nope, r, dv = 2, 16, 8, 16
    seq_lens, q_lens = [21, 5, 40], [21, 3, 17]  # a whole prompt, chunks after a cached prefix
    s, t = sum(seq_lens), sum(q_lens)
    q = torch.randn(t, h, nope + r, generator=g, dtype=torch.float64)
    k = torch.randn(s, h, nope, generator=g, dtype=torch.float64)
    k_pe = torch.randn(s, r, generator=g, dtype=torch.float64)
    v = torch.randn(s, h, dv, generator=g, dtype=torch.float64)
    qsl, ksl = [0], [0]
    for n, ql in zip(seq_lens, q_lens):
        qsl.append(qsl[-1] + ql)
        ksl.append(ksl[-1] + n)
    ref = torch.empty(t, h, dv, dtype=torch.float64)
    for b, (n, ql) in enumerate(zip(seq_lens, q_lens)):  # float64, written from the definition
        for i in range(ql):
            pos = n - ql + i
            seen = slice(ksl[b], ksl[b] + pos + 1)
            keys = torch.cat((k[seen], k_pe[seen, None].expand(-1, h, -1)), -1)
            p = (torch.einsum("hd,shd->hs", q[qsl[b] + i], keys) * 0.2).softmax(-1)
            ref[qsl[b] + i] = torch.einsum("hs,shv->hv", p, v[seen])
    args = [x.to(dtype).to(DEV) for x in (q, k, k_pe, v)]
    idx = [torch.tensor(x, device=DEV) for x in (seq_lens, qsl, ksl)]
    for fn in (mla_prefill_naive, mla_prefill_naive_torch):
        out = fn(*args, *idx, 0.2, max_q_len=max(q_lens), out=torch.full((t, h, dv), float("nan"), dtype=dtype,
                                                                         device=DEV))
        assert not out.isnan().any(), fn.__name__
        err = (out.double().cpu() - ref).abs().max() / ref.abs().max()
        assert err <= rtol, f"{fn.__name__}: {err:.2e}"
