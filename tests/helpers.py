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


def local_tp(rank: int, world_size: int):
    """A `TPContext` for one rank of a group that is not there: its collectives leave tensors as they are (an
    all-reduce returns this rank's partial sum; rank 0 "gathers" its own logits world_size times) and are
    counted in `.calls`, so a rank's forward runs, and its launches can be counted, in one process."""
    from dataclasses import dataclass, field

    from deepseek_mcp.inference.model.parallel import TPContext

    @dataclass(frozen=True)
    class LocalTP(TPContext):
        calls: list[str] = field(default_factory=list, compare=False)

        def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append("all_reduce")
            return x

        def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
            self.calls.append("gather")
            return [x] * self.world_size if self.rank == 0 else None

    return LocalTP(rank, world_size)


def drive(core, seqs, after_step=None) -> int:
    """Add `seqs` to an EngineCore and step it until every one has finished (a step's error is raised);
    `after_step()` runs after each step. Closes the core; returns the steps taken."""
    for s in seqs:
        core.scheduler.add(s)
    steps = 0
    while core.scheduler.has_work():
        result = core.step()
        if result.error is not None:
            raise result.error
        steps += 1
        if after_step is not None:
            after_step()
    core.close()
    return steps
