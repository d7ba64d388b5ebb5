"""Helpers shared by the tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-2, what: str = "") -> None:
    """|out - ref| <= rtol * |ref| + 1e-4 * max|ref| elementwise, no NaN (poison must be overwritten)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), f"{what}: NaN left in output (unwritten poison?)"
    atol = 1e-4 * ref.abs().max().item() + 1e-30
    excess = (out - ref).abs() - rtol * ref.abs() - atol
    assert excess.max().item() <= 0, f"{what}: max excess {excess.max().item():.3e} over tolerance"


def fresh_seed() -> int:
    """A seed for a test's own generator: drawn from `random`, which conftest starts from the session's seed
    before every test, so the test reruns with the same one (`--seed N`)."""
    return random.getrandbits(32)


def fixtures_dir() -> Path:
    """The shared fixtures folder: `../shared/fixtures` beside the repository (CI), else the nearest
    `shared/fixtures` above the tests (a worktree nested deeper than the clone)."""
    here = Path(__file__).resolve()
    default = here.parents[2] / "shared" / "fixtures"
    if default.is_dir():
        return default
    for parent in here.parents:
        if (parent / "shared" / "fixtures").is_dir():
            return parent / "shared" / "fixtures"
    return default
