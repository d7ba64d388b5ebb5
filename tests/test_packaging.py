"""What the install promises: the distribution owns one top-level import name, `deepseek_mcp`, and it imports
from anywhere beside the packages that own `kernels` (Hugging Face's, a dependency of transformers),
`inference` and `mcp_server` on PyPI."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"inference": "deepseek_mcp/inference", "kernels": "deepseek_mcp/kernels",
           "mcp_server": "deepseek_mcp/mcp_server", "deepseek_mcp": "deepseek_mcp"}

# Imports our engine, server and kernels, transformers' DeepSeek-V3 model (whose import loads Hugging Face's
# `kernels` where it is installed) and `kernels.get_kernel`, then says where each came from.
USE_ALL = textwrap.dedent("""
    import importlib
    import deepseek_mcp
    from deepseek_mcp.inference import AsyncEngine, Engine, SamplingParams, StreamParser
    import deepseek_mcp.inference.constrained.tool_ban, deepseek_mcp.mcp_server.server, deepseek_mcp.kernels.fp8
    from transformers import DeepseekV3ForCausalLM
    hf_kernels = importlib.import_module("kernels")  # Hugging Face's, by its top-level name
    print(Engine.__module__, SamplingParams().max_tokens > 0, AsyncEngine.__name__, DeepseekV3ForCausalLM.__name__,
          callable(hf_kernels.get_kernel))
    print(deepseek_mcp.__file__)
    print(hf_kernels.__file__)
""")


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def _hf_kernels_installed() -> None:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers 5.x needs it): nothing to collide with")
    pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the checkout (the build writes build/ and *.egg-info)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 69:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (>= 69)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist",
                                                              "*.egg-info", ".*_cache", "bench"))
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                str(tmp / "dist"), str(src)], cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("deepseek_mcp-*.whl")
    return whl


def test_wheel_installs_one_top_level_name_and_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert {n.split("/")[0] for n in names} - dist_info == {"deepseek_mcp"}, sorted({n.split("/")[0] for n in names})
    (info,) = dist_info
    top_level = f"{info}/top_level.txt"
    if top_level in names:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["deepseek_mcp"]
    # Every source file of the three folders is in the wheel, under its namespaced path (the package list in
    # pyproject.toml is written out by hand: a new subpackage must be added there).
    want = {f"{FOLDERS[p.relative_to(ROOT).parts[0]]}/{'/'.join(p.relative_to(ROOT).parts[1:])}"
            for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert want - set(names) == set()
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "deepseek-mcp = deepseek_mcp.mcp_server.__main__:main" in entry_points


def test_installed_wheel_imports_beside_hf_kernels_and_transformers(wheel: Path, tmp_path: Path) -> None:
    """The wheel unpacked into its own folder, first on the path, from a folder outside the checkout: our modules
    come from it, `kernels` from Hugging Face's distribution, and transformers' DeepSeek-V3 imports."""
    _hf_kernels_installed()
    target = tmp_path / "site"
    out = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                str(wheel)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert installed == ["bin", "deepseek_mcp"], installed  # bin/: the console script
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([sys.executable, "-c", USE_ALL], cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-3000:]
    first, ours, theirs = out.stdout.splitlines()
    assert first.split() == ["deepseek_mcp.inference.engine.engine", "True", "AsyncEngine", "DeepseekV3ForCausalLM",
                             "True"]
    assert Path(ours).is_relative_to(target) and not Path(theirs).is_relative_to(target)
    assert importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py") == Path(theirs)


def test_this_install_imports_from_anywhere(tmp_path: Path) -> None:
    """The environment the tests run in (an editable install in development) from a folder outside the checkout,
    and the `python -m` entry points."""
    _hf_kernels_installed()
    out = _run([sys.executable, "-c", USE_ALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:5] == ["deepseek_mcp.inference.engine.engine", "True", "AsyncEngine",
                                      "DeepseekV3ForCausalLM", "True"]
    for module in ("deepseek_mcp.inference", "deepseek_mcp.mcp_server"):
        out = _run([sys.executable, "-m", module, "--help"], cwd=tmp_path)
        assert out.returncode == 0 and "usage" in out.stdout, out.stderr
    import deepseek_mcp.inference

    with pytest.raises(AttributeError, match="'deepseek_mcp.inference' has no attribute 'Nope'"):
        _ = deepseek_mcp.inference.Nope


def test_script_folders_shadow_no_installed_package() -> None:
    """bench/ and tests/ go first on sys.path when their scripts run: no module there may take the top-level name
    of an installed distribution (bench/kernels.py once hid Hugging Face's `kernels` from transformers)."""
    taken = importlib.metadata.packages_distributions()
    ours = {p.stem if p.suffix == ".py" else p.name: p for folder in ("bench", "tests")
            for p in (ROOT / folder).iterdir() if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    clashes = {name: taken[name] for name in ours if name in taken}
    assert not clashes, f"rename these: {clashes}"
