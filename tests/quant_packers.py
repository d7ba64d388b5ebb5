"""4-bit checkpoint writers for the tests, written from each format's specification (not from the engine's code):
round-to-nearest group quantization, then compressed-tensors `pack-quantized`, GPTQ (v1 and v2 zero points) or
AutoAWQ GEMM tensors and quantization_config, beside the exact fp32 dequantization of the same codes (the
reference model's weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: word slot j holds column AWQ_ORDER[j] of each 8


def quantize(w: torch.Tensor, group: int, zero_point: bool, scale_dtype: torch.dtype = torch.float16
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] int64 in [0, 15], scales [N, K/G] scale_dtype, zeros [N, K/G] int64 in [0, 15])."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    if zero_point:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8).to(scale_dtype)
        z = torch.round(-lo / s.float()).clamp(0, 15).to(torch.int64)
    else:
        s = (wg.abs().amax(-1) / 7).clamp(min=1e-8).to(scale_dtype)
        z = torch.full(s.shape, 8, dtype=torch.int64)
    u = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp(0, 15).to(torch.int64)
    return u.view(n, k), s, z


def dequantize(u: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    n, k = u.shape
    g = k // s.shape[1]
    return ((u.view(n, -1, g) - z[..., None]).float() * s.float()[..., None]).view(n, k)


def pack_rows(u: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C] codes -> [R, C/8] int32: slot j (bits 4j) of word c holds code u[r, 8c + order[j]]."""
    words = torch.zeros(u.shape[0], u.shape[1] // 8, dtype=torch.int64)
    for j, col in enumerate(order):
        words |= (u[:, col::8] & 0xF) << (4 * j)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # the same 32 bits, as int32


def pack_module(fmt: str, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, zero_point: bool, v2: bool = False
                ) -> dict[str, torch.Tensor]:
    """One Linear's tensors in `fmt` (suffixes after the module name)."""
    n, k = u.shape
    if fmt == "compressed-tensors":  # signed codes q = u - 8 stored as q + 8, packed along K
        out = {"weight_packed": pack_rows(u), "weight_scale": s, "weight_shape": torch.tensor([n, k])}
        if zero_point:  # signed zero points + 8, packed along N: [N/8, K/G]
            out["weight_zero_point"] = pack_rows(z.T.contiguous()).T.contiguous()
        return out
    if fmt == "gptq":  # qweight [K/8, N] packed along K; qzeros [K/G, N/8] along N, z - 1 in v1
        zs = z if v2 else (z - 1) & 0xF
        return {"qweight": pack_rows(u).T.contiguous(),
                "qzeros": pack_rows(zs.T.contiguous()), "scales": s.T.contiguous(),
                "g_idx": (torch.arange(k) // (k // s.shape[1])).to(torch.int32)}
    assert fmt == "awq"  # qweight [K, N/8] and qzeros [K/G, N/8] along N in AWQ's order
    return {"qweight": pack_rows(u.T.contiguous(), AWQ_ORDER), "qzeros": pack_rows(z.T.contiguous(), AWQ_ORDER),
            "scales": s.T.contiguous()}


def quant_config(fmt: str, group: int, zero_point: bool, skip: list[str], v2: bool = False) -> dict:
    if fmt == "compressed-tensors":
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized",
                                              "weights": {"num_bits": 4, "type": "int", "symmetric": not zero_point,
                                                          "strategy": "group", "group_size": group,
                                                          "dynamic": False, "observer": "minmax"}}},
                "ignore": ["lm_head"] + [f"re:.*{m}.*" for m in skip]}
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": not zero_point,
                "checkpoint_format": "gptq_v2" if v2 else "gptq", "true_sequential": True,
                "modules_to_not_convert": skip or None}
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": skip or None}


SKIP_ALWAYS = ("norm", "embed_tokens", "lm_head", "mlp.gate.")


def int4_checkpoint_pair(root: Path, fmt: str, group: int, zero_point: bool, skip: tuple[str, ...] = (),
                         seed: int = 7, v2: bool = False, **model_kw) -> dict[str, Path]:
    """A tiny transformers model as a 4-bit checkpoint in `fmt` ("q") and as the exact fp32 dequantization of its
    codes ("deq"); modules whose name contains one of `skip` stay unquantized (listed in the config)."""
    from hf_checkpoints import tiny_hf_model
    from safetensors.torch import load_file

    base = root / "hf"
    base.mkdir()
    tiny_hf_model(base, seed=seed, **model_kw)
    return write_int4_pair(root, fmt, group, zero_point, load_file(str(base / "model.safetensors")),
                           json.loads((base / "config.json").read_text()), skip, v2)


def write_int4_pair(root: Path, fmt: str, group: int, zero_point: bool, tensors: dict[str, torch.Tensor],
                    cfg: dict, skip: tuple[str, ...] = (), v2: bool = False,
                    unlisted: tuple[str, ...] = ()) -> dict[str, Path]:
    """`tensors` (a checkpoint with config.json `cfg`) written as `fmt` ("q") and as the exact fp32
    dequantization of its codes ("deq"), under root/{fmt}_q and root/{fmt}_deq. Modules whose name contains one
    of `skip` (listed in the config) or of `unlisted` (not listed) stay unquantized."""
    from safetensors.torch import save_file

    scale_dtype = torch.bfloat16 if fmt == "compressed-tensors" else torch.float16
    q, deq = {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and t.dim() == 2 and not any(x in name for x in SKIP_ALWAYS + skip + unlisted):
            u, s, z = quantize(t, group, zero_point or fmt == "awq", scale_dtype)
            for suffix, packed in pack_module(fmt, u, s, z, zero_point or fmt == "awq", v2).items():
                q[f"{module}.{suffix}"] = packed
            deq[name] = dequantize(u, s, z)
        else:
            q[name] = deq[name] = t
    dirs = {}
    for kind, ts in (("q", q), ("deq", deq)):
        d = root / f"{fmt}_{kind}"
        d.mkdir()
        save_file(ts, str(d / "model.safetensors"))
        c = dict(cfg)
        if kind == "q":
            c["quantization_config"] = quant_config(fmt, group, zero_point, list(skip), v2)
        (d / "config.json").write_text(json.dumps(c))
        dirs[kind] = d
    return dirs
