"""The CPU's linear layers with weights reordered once at load into oneDNN's blocked layout.

`F.linear` on a bf16 CPU weight lays the weight out for oneDNN's inner product on every call (or falls back to a
GEMV that is not vectorized for bf16); reordering it once, as inductor's CPU freezing does, leaves one oneDNN
inner product per call. On the demo's decode shapes (one thread; `bench/head.py`, figures in bench/RESULTS.md)
that ran the 129,280 x 256 output head at one row in about the time of a plain read of its bytes, 2.3-2.5x
faster than `F.linear`, and the small projections 1.2-1.5x faster. The packed weight is an opaque MKLDNN tensor:
`unpack` gives the dense one back.

Used where `supported` holds: a dense bf16 weight on the CPU, and this build of torch runs the two private
MKLDNN ops (`_reorder_linear_weight`, `_linear_pointwise`) and matches `F.linear` on a probe. Anything else
keeps `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.bfloat16,)


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] dense -> the same weight in oneDNN's layout (an opaque MKLDNN tensor of shape [N, K])."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous())


def unpack(wp: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight of a packed one (a copy)."""
    return wp.to_dense()


def linear(x: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ wp [N, K]^T -> [..., N] in x's dtype (x must have the packed weight's dtype)."""
    return torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [None], "")


def probe(dtype: torch.dtype) -> bool:
    """Whether packing works here for `dtype`: the ops exist and give F.linear's result (within bf16 rounding)
    on a small random weight."""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g).to(dtype)  # [N, K]
    x = torch.randn(3, 96, generator=g).to(dtype)  # [M, K]
    try:
        with torch.inference_mode():
            got = linear(x, pack(w)).float()
            back = unpack(pack(w))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    want = F.linear(x.float(), w.float())
    return bool(torch.equal(back, w) and torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))


def supported(w: torch.Tensor, dtype_ok: bool) -> bool:
    """A dense weight on the CPU in a packable dtype, where `dtype_ok` is `probe(w.dtype)` (run once per model)."""
    return dtype_ok and w.device.type == "cpu" and w.dim() == 2 and w.dtype in PACKED_DTYPES and not w.is_mkldnn
