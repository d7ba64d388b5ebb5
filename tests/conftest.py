"""Session-wide test settings, applied before any test module imports torch, triton or the engine."""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

# The checkout's top-level folders are `deepseek_mcp`'s subpackages (the install maps them). Left on sys.path as
# top-level names they shadow other distributions: `kernels/` would hide Hugging Face's `kernels`, which
# transformers imports. `python -m pytest` puts the working directory first on sys.path, so take the checkout off.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _CHECKOUT]

import torch  # noqa: E402  (after the path is mended)

# Kernels run through Triton's CPU interpreter where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The demo checkpoint is written once per test session into a private cache, never the user's, and removed at
# the end of the session (about 0.3 GB).
_OWN_CACHE = None if "DEEPSEEK_MCP_CACHE" in os.environ else tempfile.mkdtemp(prefix="deepseek-mcp-test-cache-")
if _OWN_CACHE is not None:
    os.environ["DEEPSEEK_MCP_CACHE"] = _OWN_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Randomized tests draw from the global generators (`random`, torch's) or from `fresh_seed()`: every test starts
# them from one session seed, printed in the header and beside every failure, so a failure reruns exactly with
# `--seed N` or DEEPSEEK_MCP_TEST_SEED=N. A new seed is drawn per session unless one is given.
SEED_ENV = "DEEPSEEK_MCP_TEST_SEED"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seed", type=int, default=None,
                     help=f"the seed of every randomized test (default: ${SEED_ENV}, else a fresh one per session)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--seed")
    if seed is None:
        seed = int(os.environ.get(SEED_ENV) or int.from_bytes(os.urandom(4), "little"))
    config.stash[_SEED] = seed
    # Hypothesis draws from its own seed: the same one unless --hypothesis-seed says otherwise.
    if getattr(config.option, "hypothesis_seed", "absent") is None:
        config.option.hypothesis_seed = str(seed)


_SEED = pytest.StashKey[int]()


def _seed_line(config: pytest.Config) -> str:
    return f"test seed: {config.stash[_SEED]} (rerun with --seed {config.stash[_SEED]} or {SEED_ENV}=...)"


def pytest_report_header(config: pytest.Config) -> str:
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    terminalreporter.write_line(_seed_line(config))  # at the end too: `-q` hides the header


def _reseed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _seed_module(request: pytest.FixtureRequest) -> None:
    _reseed(request.config.stash[_SEED])  # module-scoped fixtures that draw numbers see the same state


@pytest.fixture(autouse=True)
def _seed_test(request: pytest.FixtureRequest) -> None:
    _reseed(request.config.stash[_SEED])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.failed:
        seed = item.config.stash[_SEED]
        report.sections.append(("seed", f"{SEED_ENV}={seed} python -m pytest '{item.nodeid}'  (or --seed {seed})"))
    return report


# Shared by the constrained-decoding tests: the bundled V3.1 tokenizer and one factory (vocabulary + grammar
# cache) per module. Imported lazily: xgrammar is only needed by the modules that use them.
@pytest.fixture(scope="module")
def tok() -> Any:
    from deepseek_mcp.inference.text.tokenizer import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="module")
def factory(tok: Any) -> Any:
    from deepseek_mcp.inference.constrained.factory import ConstraintFactory

    return ConstraintFactory(tok)
