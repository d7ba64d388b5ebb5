"""What the machine lends the engine: the memory free on a device, and the user's cache folder (the demo
checkpoint, compiled kernels, tuned configurations). Below both the model and the engine, so neither reaches
into the other for them."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def available_memory(device: torch.device) -> int:
    """Bytes free: on CUDA what the driver reports, elsewhere the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_cache_dir() -> Path:
    """$DEEPSEEK_MCP_CACHE, else $XDG_CACHE_HOME/deepseek-mcp, else ~/.cache/deepseek-mcp."""
    env = os.environ.get("DEEPSEEK_MCP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepseek-mcp"
