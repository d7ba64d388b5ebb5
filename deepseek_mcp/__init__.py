"""deepseek-mcp: a local DeepSeek-V3.1 served over MCP and OpenAI / Anthropic-compatible HTTP APIs.

The distribution installs this one top-level name. Its subpackages live in the repository's top-level folders
(`pyproject.toml` maps them with setuptools' `package-dir`):

- `deepseek_mcp.mcp_server` (`mcp_server/`): the MCP server, the HTTP APIs, the console script `deepseek-mcp`
- `deepseek_mcp.inference` (`inference/`): the engine (`from deepseek_mcp.inference import Engine, SamplingParams`)
- `deepseek_mcp.kernels` (`kernels/`): the Triton kernels
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepseek-mcp")
except PackageNotFoundError:  # pragma: no cover - imported from a copy that was never installed
    __version__ = "0+unknown"
