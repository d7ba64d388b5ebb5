"""Compile every Triton kernel ahead of time for a GPU architecture, on a machine without a GPU.

    python -m deepseek_mcp.kernels.aot [--arch 90] [--all-configs] [--sass]

Uses Triton's bundled ptxas: reports per kernel and config the registers, spilled bytes, static shared
memory and which matrix instructions the SASS uses (HGMMA / QGMMA = Hopper wgmma for bf16 / fp8; HMMA = the
older mma path). A kernel that would not compile on the GPU fails here. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deepseek_mcp.kernels.util import interpreting

_SCALARS = ("i32", "i64", "u32", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Build:
    kernel: str
    label: str
    regs: int
    spill_bytes: int
    smem: int
    mma: str


def _signature(fn, spec: dict[str, object]) -> tuple[dict, dict, dict]:
    """spec maps every argument name to a type ("*bf16:16", "i32:16", "fp32", ...) or a constexpr value."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = spec[name]
        if isinstance(v, str) and (v.startswith("*") or v.split(":")[0] in _SCALARS):
            ty, _, hint = v.partition(":")
            sig[name] = ty
            if hint == "16":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "constexpr"
            consts[name] = v
    return sig, consts, attrs


def toolchain_available() -> bool:
    """Triton with its NVIDIA backend and bundled ptxas (Linux x86_64 wheels) is importable here."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).is_file()
    except Exception:  # no triton, no NVIDIA backend, or no ptxas: nothing to compile with
        return False


def run_family(family: str, sass: bool = True, timeout: float = 600, arch: int = 90) -> list[list[str]]:
    """Compile one family in a fresh interpreter-free process -> rows [kernel, config, regs, spill, smem, mma]
    (a failed build has "FAILED" in place of regs and the message after it)."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "deepseek_mcp.kernels.aot", "--family", family, "--arch", str(arch)]
    cmd += ["--sass"] if sass else []
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=timeout)
    rows = []
    for line in done.stdout.splitlines()[1:]:
        name, rest = line[:28].strip(), line[29:]
        label, fields = rest[:32].strip(), rest[33:].split()
        rows.append([name, label, *fields])
    if done.returncode not in (0, 1) or not rows:
        raise RuntimeError(f"kernels.aot failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return rows


def compile_kernel(fn, spec: dict[str, object], num_warps: int, num_stages: int, arch: int, label: str,
                   sass: bool = False) -> Build:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):  # an Autotuner wraps the JITFunction
        fn = fn.fn
    sig, consts, attrs = _signature(fn, spec)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        mma = ""
        if sass:
            cuobjdump = Path(ptxas).with_name("cuobjdump")
            text = subprocess.run([str(cuobjdump), "-sass", str(Path(tmp) / "k.cubin")], capture_output=True,
                                  text=True, check=True).stdout
            found = sorted({m for m in re.findall(r"\b([HQ]GMMA|HMMA|QMMA|IMMA)\b", text)})
            mma = "+".join(found) or "none"
    return Build(fn.__name__, label, regs, spill, compiled.metadata.shared, mma)


def _fp8_builds(all_configs: bool):
    from deepseek_mcp.kernels import fp8_triton as k

    ptr = {"a_ptr": "*fp8e4nv:16", "a_s_ptr": "*fp32:16", "b_ptr": "*fp8e4nv:16", "b_s_ptr": "*fp32:16"}
    ints = {n: "i32:16" for n in ("M", "N", "K", "M_BUCKET", "stride_am", "stride_asm", "stride_bn", "stride_bsn",
                                  "stride_cs", "stride_cm")}
    ints |= {"stride_ask": 1, "stride_bsk": 1}
    yield k.act_quant_kernel, {"x_ptr": "*bf16:16", "y_ptr": "*fp8e4nv:16", "s_ptr": "*fp32:16", "M": "i32",
                               "K": "i32:16", "stride_xm": "i32:16", "stride_ym": "i32:16", "stride_sm": "i32",
                               "GROUP": 128, "BLOCK_M": 16, "UE8M0": True}, 4, 1, "ue8m0"
    yield k.weight_dequant_kernel, {"w_ptr": "*fp8e4nv:16", "s_ptr": "*fp32:16", "y_ptr": "*bf16:16", "N": "i32",
                                    "K": "i32", "stride_wn": "i32:16", "stride_sn": "i32", "stride_sk": 1,
                                    "stride_yn": "i32:16", "BLOCK": 128}, 8, 1, "128"
    small = k.SMALL_M_CONFIGS if all_configs else k.SMALL_M_CONFIGS[1:2]
    large = k.LARGE_M_CONFIGS if all_configs else k.LARGE_M_CONFIGS[:1]
    for cfg, split, c_ty in [(c, 4, "*fp32:16") for c in small] + [(c, 1, "*bf16:16") for c in large]:
        spec = {**ptr, **ints, "c_ptr": c_ty, "SCALE_BLOCK": 128, "SPLIT_K": split, **cfg.kwargs}
        label = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages} split{split}"
        yield k.fp8_gemm_kernel, spec, cfg.num_warps, cfg.num_stages, label
    yield k.splitk_reduce_kernel, {"ws_ptr": "*fp32:16", "c_ptr": "*bf16:16", "MN": "i32", "SPLIT_K": 4,
                                   "BLOCK": 1024}, 4, 1, "split4"


def _mla_builds(all_configs: bool):
    from deepseek_mcp.kernels import mla_triton as k

    dims = {"KV_LORA": 512, "ROPE": 64, "BLOCK_L": 512, "BLOCK_R": 64, "PAGE": 64, "UPCAST": False, "PREC": "tf32"}
    common = {"q_ptr": "*bf16:16", "qpe_ptr": "*bf16:16", "cache_ptr": "*bf16:16", "bt_ptr": "*i32:16",
              "seq_lens_ptr": "*i32:16", "o_ptr": "*fp32:16", "H": "i32", "sm_scale_log2": "fp32",
              "stride_cb": "i32:16", "stride_ct": "i32:16", "stride_btb": "i32"}
    dec = {**common, "lse_ptr": "*fp32:16", "B_BUCKET": "i32", "NUM_SPLITS": 8,
           **{n: "i32:16" for n in ("stride_qb", "stride_qh", "stride_pb", "stride_ph", "stride_ob", "stride_oh",
                                    "stride_os")}, "stride_lb": "i32:16", "stride_lh": "i32:16"}
    for cfg in k.DECODE_CONFIGS if all_configs else k.DECODE_CONFIGS[:1]:
        label = f"H{cfg.kwargs['BLOCK_H']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
        yield k.mla_decode_kernel, {**dec, **dims, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, label
    yield k.mla_decode_reduce_kernel, {"o_part_ptr": "*fp32:16", "lse_ptr": "*fp32:16", "o_ptr": "*bf16:16",
                                       **{n: "i32:16" for n in ("stride_pb", "stride_ph", "stride_ps", "stride_lb",
                                                                "stride_lh", "stride_ob", "stride_oh")},
                                       "KV_LORA": 512, "BLOCK_L": 512, "NUM_SPLITS": 8, "BLOCK_S": 8}, 4, 1, "S8"
    pre = {**common, "qsl_ptr": "*i32:16", "o_ptr": "*bf16:16", "B": "i32", "T_BUCKET": "i32",
           **{n: "i32:16" for n in ("stride_q", "stride_p", "stride_o")},
           "BLOCK_B": 16}
    for cfg in k.PREFILL_CONFIGS if all_configs else k.PREFILL_CONFIGS[:1]:
        label = f"M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
        yield k.mla_prefill_kernel, {**pre, **dims, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, label


def _moe_builds(all_configs: bool):
    from deepseek_mcp.kernels import moe_triton as k

    for cfg in k.CONFIGS if all_configs else [k.CONFIGS[0], k.CONFIGS[-1]]:
        for fp8, swiglu, gather in ((True, True, True), (True, False, False), (False, True, False)):
            if fp8 and swiglu and cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] > 8192:
                continue  # pruned at run time (spills)
            spec = {"x_ptr": "*fp8e4nv:16" if fp8 else "*bf16:16", "xs_ptr": "*fp32:16" if fp8 else "*bf16:16",
                    "w_ptr": "*fp8e4nv:16" if fp8 else "*bf16:16", "ws_ptr": "*fp32:16" if fp8 else "*bf16:16",
                    "off_ptr": "*i32:16", "ord_ptr": "*i32:16", "o_ptr": "*bf16:16", "E": "i32", "N_OUT": "i32:16",
                    "K": "i32:16", "M_BUCKET": "i32", "UP_SROW": "i32", "GATHER_K": "i32",
                    **{n: "i32:16" for n in ("stride_xm", "stride_xsm", "stride_we", "stride_wn", "stride_wse",
                                             "stride_wsn", "stride_om")},
                    "stride_wsk": 1, "FP8": fp8, "SWIGLU": swiglu, "GATHER": gather, "SCALE_BLOCK": 128, "BLOCK_E": 256,
                    "BLOCK_K": 128 if fp8 else 64, "UPCAST": False, "PREC": "tf32", **cfg.kwargs}
            label = (f"{'fp8' if fp8 else 'bf16'}{' swiglu' if swiglu else ''}{' gather' if gather else ''} "
                     f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}")
            yield k.moe_grouped_gemm_kernel, spec, cfg.num_warps, cfg.num_stages, label
    from deepseek_mcp.kernels import moe_align_triton as a

    yield a.moe_align_kernel, {"ids_ptr": "*i64:16", "off_ptr": "*i32:16", "order_ptr": "*i32:16",
                               "inv_ptr": "*i32:16", "P": "i32", "E": "i32", "BLOCK_P": a.BLOCK_P,
                               "BLOCK_E": 512}, 4, 1, f"P{a.BLOCK_P} E512 (257 experts)"


def _fused_builds(all_configs: bool):
    """The decode step's fused kernels at DeepSeek-V3.1 shapes."""
    from deepseek_mcp.kernels import mla_naive_triton, norm_triton, rope_triton, router_triton

    norm = {"x_ptr": "*bf16:16", "res_ptr": "*bf16:16", "w_ptr": "*bf16:16", "y_ptr": "*bf16:16",
            "res_out_ptr": "*bf16:16", "yq_ptr": "*fp8e4nv:16", "ys_ptr": "*fp32:16", "D": "i32:16", "eps": "fp32",
            **{n: "i32:16" for n in ("stride_x", "stride_r", "stride_y", "stride_ro", "stride_q")},
            "stride_s": "i32", "HAS_RESIDUAL": True, "ROWS": 64, "COLS": 128}
    yield norm_triton.rmsnorm_kernel, {**norm, "QUANT": False, "UE8M0": False}, 8, 1, "D7168 +res"
    yield norm_triton.rmsnorm_kernel, {**norm, "QUANT": True, "UE8M0": True}, 8, 1, "D7168 +res +ue8m0 quant"
    gemm = {"x_ptr": "*bf16:16", "w_ptr": "*fp32:16", "p_ptr": "*fp32:16", "T": "i32", "E": "i32:16",
            "D": "i32:16", "STEPS": "i32", **{n: "i32:16" for n in ("stride_x", "stride_w", "stride_ps", "stride_pt")},
            "BLOCK_E": router_triton.GEMM_BLOCK_E, "BLOCK_K": router_triton.GEMM_BLOCK_K}
    for block_t in (16, 64):
        yield router_triton.router_gemm_kernel, {**gemm, "BLOCK_T": block_t}, 4, 1, f"T{block_t} D7168 E256"
    yield router_triton.moe_route_kernel, {
        "logits_ptr": "*fp32:16", "bias_ptr": "*fp32:16", "w_ptr": "*fp32:16", "ids_ptr": "*i64:16", "S": "i32",
        "stride_ls": "i32:16", "stride_l": "i32:16", "stride_w": "i32", "stride_i": "i32", "scaling": "fp32",
        "E": 256, "N_GROUP": 8, "TOPK_GROUP": 4, "K": 8, "NORM": True, "SHARED": True, "BLOCK_G": 8, "BLOCK_EG": 32,
        "BLOCK_K": 16}, 4, 1, "E256 G8/4 k8+1 split-K"
    yield router_triton.moe_combine_kernel, {
        "ys_ptr": "*bf16:16", "w_ptr": "*fp32:16", "inv_ptr": "*i32:16", "out_ptr": "*bf16:16",
        "valid_ptr": "*i32", "D": "i32:16", "stride_y": "i32:16", "stride_w": "i32", "stride_o": "i32:16", "K": 9,
        "BLOCK_D": 1024, "LIMIT": True}, 4, 1, "k9 D7168 valid_rows"  # inv: moe_align int32; offsets[E:]: 4-B aligned
    yield rope_triton.rope_kv_cache_kernel, {
        "kv_ptr": "*bf16:16", "w_ptr": "*bf16:16", "qpe_ptr": "*bf16:16", "cos_ptr": "*fp32:16", "sin_ptr": "*fp32:16",
        "slot_ptr": "*i64:16", "cache_ptr": "*bf16:16", "qout_ptr": "*bf16:16", "C": "i32", "H": "i32", "eps": "fp32",
        **{n: "i32:16" for n in ("stride_kv", "stride_qt", "stride_qh", "stride_cs", "stride_ot", "stride_oh")},
        "stride_slot": 1, "HALF": 32, "INTERLEAVE": True, "BLOCK_C": 512, "BLOCK_I": 32}, 4, 1, "C512 R64 H128"
    yield mla_naive_triton.mla_prefill_naive_kernel, {
        "q_ptr": "*bf16:16", "k_ptr": "*bf16:16", "kpe_ptr": "*bf16:16", "v_ptr": "*bf16:16", "o_ptr": "*bf16:16",
        "seq_lens_ptr": "*i32:16", "qsl_ptr": "*i32:16", "ksl_ptr": "*i64:16", "sm_scale_log2": "fp32",
        **{n: "i32:16" for n in ("stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_ps", "stride_vs",
                                 "stride_vh", "stride_ot", "stride_oh")},
        "D_NOPE": 128, "D_ROPE": 64, "D_V": 128, "BLOCK_M": 64, "BLOCK_N": 64, "PREC": "tf32", "UPCAST": False}, \
        8, 2, "M64 N64 w8 s2"


def _w4a16_builds(all_configs: bool):
    """The weight-only GEMMs at DeepSeek-V3 shapes, bf16 activations, 257 experts (the shared one stacked): 4-bit
    with bf16 scales and group 128, and (w8a16) FP8 e4m3 with fp32 128x128 block scales."""
    from deepseek_mcp.kernels import w4a16_triton as k

    for fp8 in (False, True):
        weights = {"q_ptr": "*u8:16" if fp8 else "*i32:16", "s_ptr": "*fp32:16" if fp8 else "*bf16:16",
                   "z_ptr": "*fp32:16" if fp8 else "*u8:16", "o_ptr": "*bf16:16", "GROUP": 128, "FP8": fp8,
                   "UPCAST": False, "PREC": "tf32"}
        kind = "fp8 " if fp8 else ""
        for cfg in k.CONFIGS if all_configs else [k.CONFIGS[0], k.CONFIGS[-2]]:  # 16x64x64 (decode), 128x64x64
            label = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} " \
                    f"s{cfg.num_stages}"
            yield k.w4a16_gemm_kernel, {**weights, "x_ptr": "*bf16:16", "M": "i32", "N": "i32:16", "K": "i32:16",
                                        **{n: "i32:16" for n in ("stride_xm", "stride_qn", "stride_sn", "stride_om")},
                                        **cfg.kwargs}, cfg.num_warps, cfg.num_stages, kind + label
            for swiglu, gather in ((True, True), (False, False)):
                if k.spills(cfg, swiglu, fp8):
                    continue  # pruned at run time
                spec = {**weights, "x_ptr": "*bf16:16", "off_ptr": "*i32:16", "ord_ptr": "*i32:16", "E": "i32",
                        "N_OUT": "i32:16", "K": "i32:16", "M_BUCKET": "i32", "GATHER_K": "i32", "UP_SROW": "i32",
                        **{n: "i32:16" for n in ("stride_xm", "stride_qe", "stride_qn", "stride_se", "stride_sn",
                                                 "stride_om")},
                        "SWIGLU": swiglu, "GATHER": gather, "BLOCK_E": 512, **cfg.kwargs}
                tag = "swiglu " if swiglu else "moe "  # swiglu: with the token gather
                yield k.w4a16_moe_kernel, spec, cfg.num_warps, cfg.num_stages, kind + tag + label


FAMILIES = {"fp8": _fp8_builds, "mla": _mla_builds, "moe": _moe_builds, "fused": _fused_builds,
            "w4a16": _w4a16_builds}


def all_builds(all_configs: bool = False, families: tuple[str, ...] = tuple(FAMILIES)):
    for family in families:
        yield from FAMILIES[family](all_configs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not one per kernel")
    parser.add_argument("--sass", action="store_true", help="disassemble and report the matrix instructions")
    parser.add_argument("--family", choices=tuple(FAMILIES), action="append", help="kernel family (repeatable)")
    parser.add_argument("--only", help="kernel name substring")
    args = parser.parse_args(argv)
    if interpreting():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    print(f"{'kernel':28} {'config':32} {'regs':>4} {'spill B':>7} {'smem B':>7} mma")
    failed = 0
    for fn, spec, warps, stages, label in all_builds(args.all_configs, tuple(args.family or FAMILIES)):
        name = fn.__name__
        if args.only and args.only not in name:
            continue
        try:
            b = compile_kernel(fn, spec, warps, stages, args.arch, label, args.sass)
        except Exception as exc:  # report and go on: one broken config should not hide the others
            failed += 1
            print(f"{name:28} {label:32} FAILED: {str(exc).splitlines()[0][:200]}")
            continue
        print(f"{b.kernel:28} {b.label:32} {b.regs:4} {b.spill_bytes:7} {b.smem:7} {b.mma}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
