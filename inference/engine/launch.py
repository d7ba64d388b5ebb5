"""Start the tensor-parallel ranks: local worker processes (one per GPU, or CPU processes with gloo), or the
ranks `torchrun` started; build and load each rank's part of the model.

`python -m deepseek_mcp.inference.engine.launch` is a local worker's entry point (rank 0 starts it with the spec in the
environment); `run_worker(spec)` is the loop every rank but 0 runs, also under torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deepseek_mcp.inference.engine.distributed import ControlPlane, worker_loop
from deepseek_mcp.inference.model.checkpoint import checkpoint_is_fp8, find_checkpoint_files, load_weights
from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.parallel import TPContext, check_divisible
from deepseek_mcp.inference.model.transformer import Runtime, Transformer

log = logging.getLogger(__name__)

SPEC_ENV = "DEEPSEEK_MCP_TP_SPEC"
PARENT_FD_ENV = "DEEPSEEK_MCP_TP_PARENT_FD"
DEFAULT_TIMEOUT_S = 300.0
START_TIMEOUT_S = 600.0  # ranks joining (imports, CUDA init); loading itself is waited for without a limit


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to build its part of the model (JSON in a worker's environment)."""

    path: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    kernels: str  # "torch" | "triton"
    device_type: str  # "cpu" | "cuda"
    dequantize_fp8: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    mtp: bool = False  # the multi-token-prediction layer too (speculative decoding)


@dataclass
class Group:
    """This process's view of the ranks: its TP context, the control group and store, local workers."""

    tp: TPContext
    control: Any
    store: Any
    device: torch.device
    procs: dict[int, subprocess.Popen]
    parent_pipe: int | None = None  # rank 0's write end: closing it (or dying) stops local workers


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 when not under torchrun)."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


def rank_device(spec: RankSpec, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if spec.device_type == "cuda" else torch.device("cpu")


def _init_groups(rank: int, world_size: int, store: Any, spec: RankSpec, device: torch.device) -> tuple[Any, Any]:
    """The forward's group (NCCL on CUDA, gloo on CPU) and the control group (gloo), both with the collective
    timeout; the default group only joins the ranks, with the longer start timeout (workers import torch)."""
    timeout = timedelta(seconds=spec.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=max(spec.timeout_s, START_TIMEOUT_S)))
    forward = dist.new_group(backend=backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    return forward, control


def start_local(world_size: int, spec: RankSpec) -> Group:
    """Rank 0 in this process, ranks 1..N-1 as child processes on this machine (loopback rendezvous)."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=max(spec.timeout_s, START_TIMEOUT_S)))
    read_fd, write_fd = os.pipe()
    procs: dict[int, subprocess.Popen] = {}
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if spec.device_type == "cpu" and "OMP_NUM_THREADS" not in base:  # N processes share this machine's cores
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
    root = str(Path(__file__).resolve().parents[2])
    base["PYTHONPATH"] = os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p)
    try:
        for r in range(1, world_size):
            env = dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(store.port), **{SPEC_ENV: json.dumps(asdict(spec)), PARENT_FD_ENV: str(read_fd)})
            procs[r] = subprocess.Popen([sys.executable, "-m", "deepseek_mcp.inference.engine.launch"], env=env,
                                        stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), pass_fds=(read_fd,))
        _wait_joined(store, procs)
        device = rank_device(spec, 0)
        world, control = _init_groups(0, world_size, store, spec, device)
    except BaseException:
        os.close(write_fd)
        _terminate(procs)
        raise
    finally:
        os.close(read_fd)
    return Group(TPContext(0, world_size, world), control, store, device, procs, write_fd)


def _wait_joined(store: Any, procs: dict[int, subprocess.Popen]) -> None:
    """Before the groups form (which would wait out the start timeout): every worker reached the store, or one
    exited (an import error, a bad environment) and is named."""
    pending = set(procs)
    while pending:
        for r in sorted(pending):
            if store.check([f"joined{r}"]):
                pending.discard(r)
            elif procs[r].poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {r} (pid {procs[r].pid}) exited with code "
                                   f"{procs[r].returncode} while starting; its error is on stderr above")
        time.sleep(0.02)


def start_torchrun(spec: RankSpec) -> Group:
    """A rank that torchrun started: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from its environment."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    start = timedelta(seconds=max(spec.timeout_s, START_TIMEOUT_S))
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=start))
    store.set(f"joined{rank}", "1")
    device = rank_device(spec, int(os.environ.get("LOCAL_RANK", rank)))
    world, control = _init_groups(rank, world_size, store, spec, device)
    return Group(TPContext(rank, world_size, world), control, store, device, {})


def build_rank_model(spec: RankSpec, group: Group) -> Transformer:
    path = Path(spec.path)
    cfg = ModelConfig.from_file(path)
    files = find_checkpoint_files(path)
    fp8 = checkpoint_is_fp8(files, cfg)
    from deepseek_mcp.kernels.platform import fp8_gemm_runs

    rt = Runtime(dtype=getattr(torch, spec.dtype), kernels=spec.kernels,
                 scale_fmt=cfg.quant.scale_fmt if cfg.quant else None,
                 fp8_block=cfg.quant.block_size[0] if cfg.quant else 128,
                 fp8_gemm=fp8_gemm_runs(group.device, spec.kernels))
    model = Transformer(cfg, rt, fp8, group.device, group.tp, mtp=spec.mtp)  # this rank's part only
    load_weights(model, files, progress=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if fp8 and spec.dequantize_fp8:
        model.dequantize_fp8_()
    model.prepare_for_kernels_()
    return model.eval()


def wait_for_workers(group: Group) -> None:
    """Block until every worker loaded its part (or one failed: raise naming it)."""
    pending = set(range(1, group.tp.world_size))
    while pending:
        for r in sorted(pending):
            if group.store.check([f"err{r}"]):
                raise RuntimeError(f"tensor-parallel rank {r} failed to load: {group.store.get(f'err{r}').decode()}")
            if group.store.check([f"ready{r}"]):
                pending.discard(r)
        gone = exited(group)
        if gone:
            r, why = next(iter(gone.items()))
            raise RuntimeError(f"tensor-parallel rank {r} {why} while loading")
        time.sleep(0.05)


def exited(group: Group) -> dict[int, str]:
    return {r: f"(pid {p.pid}) exited with code {p.returncode}" for r, p in group.procs.items()
            if p.poll() is not None}


def _terminate(procs: dict[int, subprocess.Popen], wait_s: float = 5.0) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
            p.send_signal(signal.SIGCONT)  # a stopped (hung) worker handles the SIGTERM only once continued
    deadline = time.monotonic() + wait_s
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def control_plane(group: Group, timeout_s: float) -> ControlPlane:
    return ControlPlane(group.tp.world_size, group.control, group.store, timeout_s,
                        worker_status=lambda: exited(group), stop_workers=lambda: _terminate(group.procs))


def shutdown(group: Group, plane: ControlPlane | None, wait_s: float = 10.0) -> None:
    """Stop the workers (STOP, then terminate what is left), close the pipe, destroy the process groups."""
    if plane is not None:
        plane.close()
    deadline = time.monotonic() + wait_s
    for p in group.procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _terminate(group.procs)
    if group.parent_pipe is not None:
        os.close(group.parent_pipe)
        group.parent_pipe = None
    if dist.is_initialized():
        dist.destroy_process_group()


def start_ranks(spec: RankSpec, world_size: int) -> tuple[Transformer, Group, ControlPlane]:
    """Rank 0 of a tensor-parallel engine: start (or join, under torchrun) the other ranks, load this rank's
    part, wait until every rank has loaded its own. Sizes that do not split are refused before any start."""
    check_divisible(ModelConfig.from_file(spec.path), world_size)
    if dist.is_initialized():
        raise ValueError("a tensor-parallel engine (or another torch.distributed user) is already running in this "
                         "process; close() it first")
    if spec.device_type == "cuda" and torch.cuda.device_count() < world_size and not under_torchrun():
        raise ValueError(f"tensor-parallel size {world_size} needs {world_size} GPUs on this machine, "
                         f"found {torch.cuda.device_count()}; use torchrun across machines")
    group = start_torchrun(spec) if under_torchrun() else start_local(world_size, spec)
    if group.tp.world_size != world_size:
        shutdown(group, None)
        raise ValueError(f"torchrun started {group.tp.world_size} ranks, but tensor_parallel_size is {world_size}")
    try:
        model = build_rank_model(spec, group)
        wait_for_workers(group)
        plane = control_plane(group, spec.timeout_s)
        group.store.set("serving", "1")  # the workers start waiting for commands (with the timeout) only now
        return model, group, plane
    except BaseException:
        shutdown(group, None, wait_s=0)
        raise


def _watch_parent(fd: int) -> None:
    """Exit as soon as rank 0 is gone: its end of the pipe closes (on exit, crash or kill -9)."""
    def wait() -> None:
        try:
            os.read(fd, 1)
        finally:
            os._exit(3)

    threading.Thread(target=wait, name="tp-parent-watch", daemon=True).start()


def run_worker(spec: RankSpec) -> int:
    """Every rank but 0: join, load this rank's slices, then run rank 0's commands until STOP."""
    group = start_torchrun(spec)
    rank = group.tp.rank
    try:
        check_divisible(ModelConfig.from_file(spec.path), group.tp.world_size)
        model = build_rank_model(spec, group)
    except Exception as e:
        group.store.set(f"err{rank}", f"{type(e).__name__}: {e}")
        raise
    group.store.set(f"ready{rank}", "1")
    log.info("tensor-parallel rank %d ready", rank)
    while not group.store.check(["serving"]):  # rank 0 may still be loading: no collective timeout yet
        time.sleep(0.05)
    worker_loop(rank, model, group.control, group.store, group.device, getattr(torch, spec.dtype))
    dist.destroy_process_group()
    return 0


def main() -> int:
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(levelname)s rank {rank}: %(message)s")
    fd = os.environ.get(PARENT_FD_ENV)
    if fd is not None:
        _watch_parent(int(fd))
    spec = RankSpec(**json.loads(os.environ[SPEC_ENV]))
    try:
        return run_worker(spec)
    except Exception:
        log.exception("tensor-parallel worker failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
