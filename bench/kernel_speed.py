"""Check (against the torch twins) and time every Triton kernel on a CUDA GPU; print one table per kernel.

    python bench/kernel_speed.py [--quick] [--only fp8|mla|moe|w4a16]

(Not `kernels.py`: a script's folder is first on sys.path, and a `kernels` module there hides Hugging Face's
`kernels`, which transformers imports.)

Timing: triton.testing.do_bench (warmup, L2 flushed between runs, median). Bandwidth is compared with a measured
device-to-device copy (read + write bytes / time). Targets from the kernels issue are printed beside the results;
they are recorded here, not asserted. Without CUDA (or Triton) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the references the kernels are checked against

GEMM_SHAPES = [(24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (2112, 7168), (7168, 2048)]
GEMM_MS = [1, 16, 64, 128, 4096]


def timed(fn) -> float:
    """Median milliseconds of fn()."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(dev: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _gemm_row(dev, m: int, b: torch.Tensor, b_s: torch.Tensor, w_bf16: torch.Tensor, copy_gbs: float) -> list[str]:
    from reference.fp8 import fp8_gemm_torch

    from deepseek_mcp.kernels import fp8_triton
    from deepseek_mcp.kernels.fp8 import act_quant, fp8_gemm

    n, k = b.shape
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    a, a_s = act_quant(x, 128, "ue8m0")
    out = fp8_gemm(a, a_s, b, b_s)
    err = rel_err(out, fp8_gemm_torch(a, a_s, b, b_s)) if m <= 128 or n * k <= 1 << 25 else float("nan")
    t8 = timed(lambda: fp8_gemm(a, a_s, b, b_s, out=out))
    t16 = timed(lambda: torch.matmul(x, w_bf16.T))
    tflops, tflops16 = 2 * m * n * k / t8 / 1e9, 2 * m * n * k / t16 / 1e9
    gbs = (n * k + m * k + 2 * m * n + 4 * (b_s.numel() + a_s.numel())) / t8 / 1e6
    tuner = fp8_triton._gemm_small if m <= fp8_triton.SMALL_M_MAX else fp8_triton._gemm_large
    cfg = getattr(tuner, "best_config", None)
    cfg_s = "" if cfg is None else (f"{cfg.kwargs.get('BLOCK_M')}x{cfg.kwargs.get('BLOCK_N')}"
                                    f"w{cfg.num_warps}s{cfg.num_stages}")
    split = fp8_triton.split_k_for(m, n, k, torch.cuda.get_device_properties(dev).multi_processor_count)
    target = ""
    if m >= 2048:
        target = f"x{t16 / t8:.2f} (>=1.3)"
    elif m <= 16:
        target = f"{100 * gbs / copy_gbs:.0f}% (>=60%)"
    return [str(m), str(n), str(k), f"{err:.1e}", f"{t8 * 1e3:.1f}", f"{tflops:.0f}", f"{t16 * 1e3:.1f}",
            f"{tflops16:.0f}", f"{t16 / t8:.2f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%", f"{cfg_s} k{split}",
            target]


def bench_fp8(dev: torch.device, copy_gbs: float, quick: bool) -> None:
    rows = []
    for n, k in GEMM_SHAPES[2:4] if quick else GEMM_SHAPES:
        w_bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        b = (torch.randn(n, k, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        b_s = torch.rand(-(-n // 128), -(-k // 128), device=dev) * 1e-3 + 1e-4
        rows += [_gemm_row(dev, m, b, b_s, w_bf16, copy_gbs) for m in ([1, 4096] if quick else GEMM_MS)]
    table("fp8_gemm (A [M,K] x B [N,K]^T, e4m3, 1x128 / 128x128 scales) vs torch bf16 matmul",
          ["M", "N", "K", "relerr", "fp8 us", "TFLOPS", "bf16 us", "TFLOPS", "speedup", "GB/s", "%copy", "config",
           "target"], rows)


def _mla_row(dev, bsz: int, ctx: int, copy_gbs: float) -> list[str]:
    from reference.mla import mla_decode_torch

    from deepseek_mcp.kernels.mla import mla_decode
    from deepseek_mcp.kernels.mla_triton import num_splits_for

    heads, kv_lora, rope, block = 128, 512, 64, 64
    nblk = bsz * ctx // block
    cache = torch.randn(nblk, block, kv_lora + rope, device=dev, dtype=torch.bfloat16)
    bt = torch.randperm(nblk, device=dev).int().view(bsz, ctx // block)
    sl = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(bsz, heads, kv_lora, device=dev, dtype=torch.bfloat16)
    qpe = torch.randn(bsz, heads, rope, device=dev, dtype=torch.bfloat16)
    scale = 0.1
    out = mla_decode(q, qpe, cache, bt, sl, scale, max_seq_len=ctx)
    n_chk = min(bsz, 2)  # the twin on two sequences is enough to catch a wrong kernel
    err = rel_err(out[:n_chk], mla_decode_torch(q[:n_chk], qpe[:n_chk], cache, bt[:n_chk], sl[:n_chk], scale))
    t = timed(lambda: mla_decode(q, qpe, cache, bt, sl, scale, max_seq_len=ctx, out=out))
    gbs = (bsz * ctx * (kv_lora + rope) * 2 + (q.numel() + qpe.numel() + out.numel()) * 2) / t / 1e6
    target = f"{100 * gbs / copy_gbs:.0f}% (>=70%)" if bsz >= 8 and ctx >= 8192 else ""
    splits = num_splits_for(bsz, heads, ctx, torch.cuda.get_device_properties(dev).multi_processor_count)
    return [str(bsz), str(ctx), str(splits), f"{err:.1e}", f"{t * 1e3:.1f}", f"{gbs:.0f}",
            f"{100 * gbs / copy_gbs:.0f}%", target]


def bench_mla(dev: torch.device, copy_gbs: float, quick: bool) -> None:
    rows = [_mla_row(dev, bsz, ctx, copy_gbs) for bsz in ([8] if quick else [1, 8, 64])
            for ctx in ([8192] if quick else [1024, 8192, 65536])]
    table("mla_decode (H=128, kv_lora=512, rope=64, bf16 cache, block 64)",
          ["batch", "context", "splits", "relerr", "us", "GB/s", "%copy", "target"], rows)


def _moe_row(dev, phase: str, tokens: int, proj: str, w, s, act, copy_gbs: float) -> list[str]:
    from reference.moe import moe_grouped_gemm_torch

    from deepseek_mcp.kernels.fp8 import act_quant
    from deepseek_mcp.kernels.moe import moe_grouped_gemm

    experts, n, k = w.shape
    ids = torch.rand(tokens, experts, device=dev).topk(8, dim=-1).indices.flatten()  # top-8 routing
    counts = torch.bincount(ids, minlength=experts)
    off = torch.zeros(experts + 1, dtype=torch.int32, device=dev)
    off[1:] = counts.cumsum(0)
    active, m = int((counts > 0).sum()), ids.numel()
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    out = moe_grouped_gemm(x, off, w, s, act, scale_fmt="ue8m0")
    err = float("nan")
    if m <= 4096:  # the twin loops over experts: fine for decode, slow for prefill
        err = rel_err(out, moe_grouped_gemm_torch(x, off, w, s, act, scale_fmt="ue8m0"))
    t = timed(lambda: moe_grouped_gemm(x, off, w, s, act, scale_fmt="ue8m0", out=out))
    tq = timed(lambda: act_quant(x, 128, "ue8m0"))
    gbs = (active * n * k + x.numel() * 2 + out.numel() * 2) / t / 1e6
    return [phase, str(tokens), proj, str(active), f"{err:.1e}", f"{t * 1e3:.1f}", f"{tq * 1e3:.1f}",
            f"{2 * m * n * k / t / 1e9:.0f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"]


def bench_moe(dev: torch.device, copy_gbs: float, quick: bool) -> None:
    experts, hidden, inter = 256, 7168, 2048
    w13 = (torch.randn(experts, 2 * inter, hidden, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s13 = torch.rand(experts, 2 * inter // 128, hidden // 128, device=dev) * 1e-3 + 1e-4
    w2 = (torch.randn(experts, hidden, inter, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s2 = torch.rand(experts, hidden // 128, inter // 128, device=dev) * 1e-3 + 1e-4
    rows = []
    for phase, tokens in [("decode", 32)] if quick else [("decode", 1), ("decode", 32), ("prefill", 4096)]:
        rows.append(_moe_row(dev, phase, tokens, "gate+up swiglu", w13, s13, "swiglu", copy_gbs))
        rows.append(_moe_row(dev, phase, tokens, "down", w2, s2, None, copy_gbs))
    table(f"moe_grouped_gemm (V3: {experts} experts, top-8, hidden {hidden}, inter {inter}, FP8 UE8M0)",
          ["phase", "tokens", "proj", "experts", "relerr", "us (incl act_quant)", "act_quant us", "TFLOPS", "GB/s",
           "%copy"], rows)


def _int4(dev, lead: tuple[int, ...], n: int, k: int, group: int = 128):
    """Random 4-bit weight in the engine's form: codes [*lead, N, K/8] int32, bf16 scales, uint8 zeros."""
    q = torch.randint(-(2**31), 2**31, (*lead, n, k // 8), dtype=torch.int32, device=dev)
    s = (torch.rand(*lead, n, k // group, device=dev) * 0.02 + 0.002).to(torch.bfloat16)
    z = torch.randint(0, 16, (*lead, n, k // group), dtype=torch.uint8, device=dev)
    return q, s, z


def bench_w4a16(dev: torch.device, copy_gbs: float, quick: bool) -> None:
    """W4A16 dense GEMM at V3's projection shapes and the grouped expert GEMM (256 experts, top-8), group 128;
    bytes = the 4-bit weight (+ scales and zeros) read once + activations in and out."""
    from reference.w4a16 import w4a16_gemm_torch, w4a16_moe_gemm_torch

    from deepseek_mcp.kernels.w4a16 import w4a16_gemm, w4a16_moe_gemm

    rows = []
    for n, k in GEMM_SHAPES[:2] if quick else GEMM_SHAPES:
        q, s, z = _int4(dev, (), n, k)
        wbytes = q.numel() * 4 + s.numel() * 3
        for m in [1, 4096] if quick else GEMM_MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = w4a16_gemm(x, q, s, z)
            err = rel_err(out, w4a16_gemm_torch(x, q, s, z))
            t = timed(lambda: w4a16_gemm(x, q, s, z, out=out))  # noqa: B023
            gbs = (wbytes + x.numel() * 2 + out.numel() * 2) / t / 1e6
            rows.append([str(m), str(n), str(k), f"{err:.1e}", f"{t * 1e3:.1f}", f"{2 * m * n * k / t / 1e9:.0f}",
                         f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"])
    table("w4a16_gemm (bf16 x, 4-bit W, group 128)", ["M", "N", "K", "relerr", "us", "TFLOPS", "GB/s", "%copy"],
          rows)
    experts, hidden, inter = 256, 7168, 2048
    w13, w2 = _int4(dev, (experts,), 2 * inter, hidden), _int4(dev, (experts,), hidden, inter)
    rows = []
    for phase, tokens in [("decode", 32)] if quick else [("decode", 1), ("decode", 32), ("prefill", 4096)]:
        ids = torch.rand(tokens, experts, device=dev).topk(8, dim=-1).indices.flatten()
        counts = torch.bincount(ids, minlength=experts)
        off = torch.zeros(experts + 1, dtype=torch.int32, device=dev)
        off[1:] = counts.cumsum(0)
        active, m = int((counts > 0).sum()), ids.numel()
        for proj, (q, s, z), act, k in (("gate+up swiglu", w13, "swiglu", hidden), ("down", w2, None, inter)):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = w4a16_moe_gemm(x, off, q, s, z, act)
            err = rel_err(out, w4a16_moe_gemm_torch(x, off, q, s, z, act)) if m <= 4096 else float("nan")
            t = timed(lambda: w4a16_moe_gemm(x, off, q, s, z, act, out=out))  # noqa: B023
            n = q.shape[1]
            gbs = (active * (n * k // 2 + n * k // 128 * 3) + x.numel() * 2 + out.numel() * 2) / t / 1e6
            rows.append([phase, str(tokens), proj, str(active), f"{err:.1e}", f"{t * 1e3:.1f}",
                         f"{2 * m * n * k / t / 1e9:.0f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"])
    table(f"w4a16_moe_gemm (V3: {experts} experts, top-8, hidden {hidden}, inter {inter}, group 128)",
          ["phase", "tokens", "proj", "experts", "relerr", "us", "TFLOPS", "GB/s", "%copy"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--only", choices=("fp8", "mla", "moe", "w4a16"), help="one kernel family")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py: no CUDA device here; nothing to time. "
              "(The kernels are checked on CPU by tests/test_kernels_*.py through the Triton interpreter.)")
        return 0
    from deepseek_mcp.kernels.platform import triton_available

    if not triton_available():
        print("bench/kernel_speed.py: triton is not installed; nothing to time.")
        return 0
    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    copy_gbs = copy_bandwidth(dev)
    print(f"device: {props.name} ({props.multi_processor_count} SMs, cc {props.major}.{props.minor}), "
          f"torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {copy_gbs:.0f} GB/s")
    if args.only in (None, "fp8"):
        bench_fp8(dev, copy_gbs, args.quick)
    if args.only in (None, "mla"):
        bench_mla(dev, copy_gbs, args.quick)
    if args.only in (None, "moe"):
        bench_moe(dev, copy_gbs, args.quick)
    if args.only in (None, "w4a16"):
        bench_w4a16(dev, copy_gbs, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
