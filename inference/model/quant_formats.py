"""The three on-disk 4-bit weight formats of DeepSeek-V3 community checkpoints, read into the engine's one form
(int4.py): the scheme from `config.json`'s `quantization_config`, which modules it leaves unquantized, and a
reader per format that turns one module's tensors (only this rank's slice, read through `get_slice`) into
(qweight [N, K/8] int32, scales [N, K/G] as stored, zeros [N, K/G] uint8).

- compressed-tensors `pack-quantized` (llm-compressor, RedHatAI's W4A16): `weight_packed` int32 [N, K/8] packed
  along K (code + 8 of a signed int4, code j in bits 4j), `weight_scale` [N, K/G], `weight_shape` [2], and for an
  asymmetric scheme `weight_zero_point` int32 [N/8, K/G] (signed zero points + 8, packed along N); W = (q - zp) s.
- GPTQ (AutoGPTQ / GPTQModel, Intel AutoRound's `auto_gptq` packing): `qweight` int32 [K/8, N] packed along K,
  `qzeros` int32 [K/G, N/8] packed along N, `scales` [K/G, N], `g_idx` [K]; W = (q - z) s, where the original
  ("gptq", v1) format stores z - 1 in qzeros and `gptq_v2` stores z. `desc_act` (act-order) is refused.
- AWQ GEMM (AutoAWQ): `qweight` int32 [K, N/8] and `qzeros` int32 [K/G, N/8] packed along N with the AWQ order
  (word slot j holds column [0, 2, 4, 6, 1, 3, 5, 7][j] of each 8), `scales` [K/G, N]; W = (q - z) s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from deepseek_mcp.inference.model.int4 import PACK, pack_int4, unpack_int4
from deepseek_mcp.inference.model.parallel import Shard

FORMATS = ("compressed-tensors", "gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ word slot j holds column AWQ_ORDER[j] of its 8
AWQ_UNDO = (0, 4, 1, 5, 2, 6, 3, 7)  # column c sits in slot AWQ_UNDO[c]


class Int4FormatError(ValueError):
    """A quantization_config or a module's 4-bit tensors that cannot be read; the message names the tensor."""


@dataclass(frozen=True)
class Int4Scheme:
    """A checkpoint's 4-bit weight scheme. `skip`: (how, pattern) pairs naming the modules left unquantized, how
    in "exact", "regex" (re.match, compressed-tensors' "re:" and GPTQModel's "-:"), "substring" (AWQ's and
    transformers' `modules_to_not_convert`)."""

    fmt: str  # one of FORMATS
    group_size: int
    zero_point: bool  # the checkpoint stores zero points (else z = 8)
    gptq_v1: bool = False  # GPTQ's original format: qzeros hold z - 1
    skip: tuple[tuple[str, str], ...] = ()
    scale_dtype: str = "float16"  # the scales' dtype in the checkpoint, kept in memory (never rounded)

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def quantizes(self, module: str) -> bool:
        """Whether the Linear `module` (checkpoint name without `.weight`) is stored in 4 bits."""
        if not module or module == "lm_head" or module.endswith("mlp.gate"):
            return False  # the head and the router are never converted by these tools' DeepSeek recipes
        for how, pattern in self.skip:
            if (how == "exact" and module == pattern) or (how == "substring" and pattern in module) or \
                    (how == "regex" and re.match(pattern, module)):
                return False
        return True


def parse_scheme(q: dict[str, Any], source: str, model_dtype: str = "bfloat16") -> Int4Scheme:
    """`quantization_config` of a 4-bit checkpoint -> Int4Scheme; Int4FormatError naming the key otherwise.
    `model_dtype`: config.json's torch_dtype, the dtype compressed-tensors writes scales in."""
    method = q.get("quant_method")
    where = f"{source}: quantization_config"
    if method == "compressed-tensors":
        scale = model_dtype if model_dtype in ("bfloat16", "float16", "float32") else "bfloat16"
        return replace(_parse_ct(q, where), scale_dtype=scale)
    if method in ("gptq", "auto-round"):
        return _parse_gptq(q, where)
    if method == "awq":
        bits, group = q.get("bits", q.get("w_bit", 4)), q.get("group_size", q.get("q_group_size", 128))
        _check_bits_group(bits, group, where)
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise Int4FormatError(f"{where}.version {version!r} is not supported (AWQ 'gemm' packing only)")
        if not q.get("zero_point", True):
            raise Int4FormatError(f"{where}.zero_point false is not supported (AutoAWQ GEMM checkpoints store "
                                  "zero points)")
        skip = tuple(("substring", m) for m in q.get("modules_to_not_convert") or ())
        return Int4Scheme("awq", int(group), True, skip=skip)
    raise Int4FormatError(f"{where}.quant_method {method!r} is not supported (expected 'fp8', "
                          "'compressed-tensors', 'gptq', 'auto-round' or 'awq')")


def _check_bits_group(bits: Any, group: Any, where: str) -> None:
    if bits != 4:
        raise Int4FormatError(f"{where}: {bits}-bit weights are not supported (4-bit only)")
    if not isinstance(group, int) or group <= 0 or group % PACK:
        raise Int4FormatError(f"{where}: group_size {group!r} is not supported (a positive multiple of 8 such as "
                              "64 or 128; per-channel -1 is not)")


def _parse_ct(q: dict[str, Any], where: str) -> Int4Scheme:
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise Int4FormatError(f"{where}.config_groups has {len(groups)} groups; one W4A16 group is supported")
    (name, grp), = groups.items()
    fmt = grp.get("format") or fmt
    if fmt != "pack-quantized":
        raise Int4FormatError(f"{where}.format {fmt!r} is not supported (expected 'pack-quantized')")
    if grp.get("input_activations"):
        raise Int4FormatError(f"{where}.config_groups.{name}.input_activations is set; only weight-only W4A16 "
                              "checkpoints are supported")
    w = grp.get("weights") or {}
    if w.get("type", "int") != "int" or w.get("strategy") != "group":
        raise Int4FormatError(f"{where}.config_groups.{name}.weights: type {w.get('type')!r} strategy "
                              f"{w.get('strategy')!r} is not supported (int, group)")
    _check_bits_group(w.get("num_bits"), w.get("group_size"), f"{where}.config_groups.{name}.weights")
    skip = tuple(("regex", p.removeprefix("re:")) if p.startswith("re:") else ("exact", p)
                 for p in q.get("ignore") or ())
    return Int4Scheme("compressed-tensors", int(w["group_size"]), not w.get("symmetric", True), skip=skip)


def _parse_gptq(q: dict[str, Any], where: str) -> Int4Scheme:
    if q.get("quant_method") == "auto-round" and "gptq" not in str(q.get("packing_format", "auto_gptq")):
        raise Int4FormatError(f"{where}.packing_format {q.get('packing_format')!r} is not supported (AutoRound "
                              "checkpoints in the 'auto_gptq' packing only)")
    _check_bits_group(q.get("bits"), q.get("group_size"), where)
    if q.get("lm_head"):
        raise Int4FormatError(f"{where}.lm_head true is not supported: the output head is kept in 16 bits here")
    if q.get("desc_act"):
        raise Int4FormatError(f"{where}.desc_act true (act-order) is not supported: its g_idx scatters each "
                              "quantization group over the input dimension, so groups are neither contiguous for "
                              "the grouped kernels nor splittable per rank; use a checkpoint quantized with "
                              "desc_act false")
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise Int4FormatError(f"{where}.checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
    skip: list[tuple[str, str]] = [("substring", m) for m in q.get("modules_to_not_convert") or ()]
    skip += [("regex", k.removeprefix("-:")) for k in (q.get("dynamic") or {}) if k.startswith("-:")]
    skip += [("exact", k) for k, v in (q.get("extra_config") or {}).items()
             if isinstance(v, dict) and int(v.get("bits", 4)) >= 16]
    return Int4Scheme("gptq", int(q["group_size"]), not q.get("sym", True) or fmt == "gptq", fmt == "gptq", tuple(skip))


Getter = Callable[[str], Any]  # checkpoint tensor name -> its safetensors slice (Int4FormatError if absent)


def _read(get: Getter, name: str, whole: tuple[int, ...], dim: int | None, start: int, size: int,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Along `dim` the range [start, start + size) of tensor `name`, whose whole shape must be `whole`."""
    sl = get(name)
    shape = tuple(sl.get_shape())
    if shape != whole:
        raise Int4FormatError(f"tensor {name} has shape {shape}, expected {whole} from config.json and the "
                              "quantization_config")
    index = [slice(None)] * len(shape)
    if dim is not None:
        index[dim] = slice(start, start + size)
    t = sl[tuple(index)]
    if dtype is not None and t.dtype != dtype:
        raise Int4FormatError(f"tensor {name} is {t.dtype}, expected {dtype} (packed 4-bit codes)")
    if dtype is None and not t.is_floating_point():
        raise Int4FormatError(f"tensor {name} is {t.dtype}, expected floating-point scales")
    return t


def read_int4(scheme: Int4Scheme, get: Getter, module: str, n: int, k: int, shard: Shard | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's part of the [N, K] weight `module` -> (qweight [n, k/8] int32, scales [n, k/G] as stored, zeros
    [n, k/G] uint8), `shard` the slice held along N (dim 0) or K (dim 1), None for all of it."""
    g = scheme.group_size
    dim, start, size = (None, 0, 0) if shard is None else (shard.dim, shard.start, shard.size)
    rows = (start, size) if dim == 0 else (0, n)  # along N
    cols = (start, size) if dim == 1 else (0, k)  # along K

    def part(name: str, whole: tuple[int, ...], n_axis: int, n_unit: int, k_axis: int, k_unit: int,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        if dim is None:
            return _read(get, name, whole, None, 0, 0, dtype)
        axis, unit = (n_axis, n_unit) if dim == 0 else (k_axis, k_unit)
        return _read(get, name, whole, axis, start // unit, size // unit, dtype)

    if scheme.fmt == "compressed-tensors":
        qweight = part(f"{module}.weight_packed", (n, k // PACK), 0, 1, 1, PACK, torch.int32)
        scales = part(f"{module}.weight_scale", (n, k // g), 0, 1, 1, g)
        shape = get(f"{module}.weight_shape")[:]
        if shape.is_floating_point() or shape.tolist() != [n, k]:
            raise Int4FormatError(f"tensor {module}.weight_shape is {shape.tolist()} ({shape.dtype}), expected "
                                  f"the integers {[n, k]}")
        if scheme.zero_point:
            zp = part(f"{module}.weight_zero_point", (-(-n // PACK), k // g), 0, PACK, 1, g, torch.int32)
            zeros = unpack_int4(zp.T.contiguous()).T[: rows[1]]  # [n, k/G]: signed zero point + 8
        else:
            zeros = torch.full_like(scales, 8, dtype=torch.uint8)
        return qweight.contiguous(), scales, zeros.contiguous()
    if scheme.fmt == "gptq":
        qweight = part(f"{module}.qweight", (k // PACK, n), 1, 1, 0, PACK, torch.int32)
        qzeros = part(f"{module}.qzeros", (k // g, -(-n // PACK)), 1, PACK, 0, g, torch.int32)
        scales = part(f"{module}.scales", (k // g, n), 1, 1, 0, g)
        _check_g_idx(get, module, k, g, cols)
        zeros = unpack_int4(qzeros)[:, : rows[1]].T  # [n, k/G]
        if scheme.gptq_v1:
            zeros = (zeros + 1) & 0xF  # v1 stores z - 1 (sym: 7 for 8)
        return qweight.T.contiguous(), scales.T.contiguous(), zeros.contiguous()
    qweight = part(f"{module}.qweight", (k, n // PACK), 1, PACK, 0, 1, torch.int32)
    qzeros = part(f"{module}.qzeros", (k // g, n // PACK), 1, PACK, 0, g, torch.int32)
    scales = part(f"{module}.scales", (k // g, n), 1, 1, 0, g)
    u = _awq_columns(unpack_int4(qweight))  # [k, n]
    zeros = _awq_columns(unpack_int4(qzeros))  # [k/G, n]
    return pack_int4(u.T), scales.T.contiguous(), zeros.T.contiguous()


def _awq_columns(u: torch.Tensor) -> torch.Tensor:
    """[R, C] codes in AWQ's word order -> the same codes in column order."""
    r, c = u.shape
    undo = torch.tensor(AWQ_UNDO, device=u.device)
    return u.view(r, c // PACK, PACK)[:, :, undo].reshape(r, c)


def _check_g_idx(get: Getter, module: str, k: int, g: int, cols: tuple[int, int]) -> None:
    """Without act-order every input column k belongs to group k // G; a g_idx saying otherwise is refused."""
    try:
        sl = get(f"{module}.g_idx")
    except Int4FormatError:
        return  # optional: GPTQModel omits it without act-order
    if tuple(sl.get_shape()) != (k,):
        raise Int4FormatError(f"tensor {module}.g_idx has shape {tuple(sl.get_shape())}, expected {(k,)}")
    start, size = cols
    g_idx = sl[start : start + size].to(torch.int64)
    if not torch.equal(g_idx, torch.arange(start, start + size) // g):
        raise Int4FormatError(f"tensor {module}.g_idx is not k // group_size ({g}): an act-order (desc_act) "
                              "checkpoint, which is not supported")
