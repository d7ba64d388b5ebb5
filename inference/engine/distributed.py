"""The control plane of tensor parallelism: rank 0 drives, the other ranks run the same forward.

Rank 0 owns the scheduler, block manager, sampling and the front end. Each step `DistributedRunner.run` (the
`ModelRunner` interface, so `EngineCore` does not change) broadcasts the step's inputs on a CPU gloo group: one
fixed-size int64 message, a header `[command, cache id, a, b, payload length]` then the payload (per sequence:
new-token count, start position, its block list's handle and length; the token ids; only the blocks added since
the last step, `step_codec.py`), with a second broadcast only for a payload too long to fit inline. Every worker
rebuilds the same batch and runs the same forward; only rank 0 gets the logits. Workers run no per-request
Python beyond extending each live block list by its new blocks. With the MTP drafter, RUN keeps every rank's
hidden states and DRAFT runs the layer's forwards on them (the rows of the states to read, then the step).

Failure: every process group has a timeout; a keep-alive thread sends no-op commands while idle, so a worker
waiting for a command notices a dead rank 0 and a dead worker is noticed even between requests. Workers write a
heartbeat and any error into the store; when a collective fails rank 0 names the rank from them (or from the
exit code of a local worker), stops the others, and every later call fails with that message.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.runner import ModelRunner
from deepseek_mcp.inference.engine.step_codec import StepDecoder, StepEncoder

log = logging.getLogger(__name__)

NOOP, NEW_CACHE, FREE_CACHE, RUN, STOP, WARM_UP, DRAFT = range(7)
HEADER = 5
MESSAGE = 512  # int64 slots per broadcast: the header, then a payload that fits inline (a decode step of ~100
# sequences with short tables); a longer payload follows in a second broadcast
HEARTBEAT_S = 0.5


class WorkerFailure(RuntimeError):
    """A tensor-parallel rank died, hung or failed; the message names it. The engine cannot serve any more."""


class ControlPlane:
    """Rank 0's side: sends commands, watches the workers, holds the failure once there is one."""

    def __init__(self, world_size: int, control_group: Any, store: Any, timeout_s: float,
                 worker_status: Callable[[], dict[int, str]], stop_workers: Callable[[], None]):
        """`worker_status`: rank -> why it is gone, for local worker processes that exited (empty otherwise);
        `stop_workers`: terminates what is left of the local workers."""
        self.world_size, self.group, self.store, self.timeout_s = world_size, control_group, store, timeout_s
        self._worker_status, self._stop_workers = worker_status, stop_workers
        self._lock = threading.Lock()
        self._next_id = 0
        self._frees: deque[int] = deque()
        self._last_send = time.monotonic()
        self.failure: str | None = None
        self._closed = threading.Event()
        self.bytes_broadcast = 0  # payload + headers, for the benchmark
        self._keepalive = threading.Thread(target=self._keep_alive, name="tp-keepalive", daemon=True)
        self._keepalive.start()

    # -- commands ------------------------------------------------------------------------------------
    def _send(self, cmd: int, cache_id: int = 0, a: int = 0, b: int = 0, payload: torch.Tensor | None = None):
        n = 0 if payload is None else payload.numel()
        message = torch.zeros(MESSAGE, dtype=torch.int64)
        message[:HEADER] = torch.tensor([cmd, cache_id, a, b, n])
        if payload is not None and n <= MESSAGE - HEADER:
            message[HEADER : HEADER + n] = payload
        dist.broadcast(message, src=0, group=self.group)
        self.bytes_broadcast += 8 * MESSAGE
        if payload is not None and n > MESSAGE - HEADER:
            dist.broadcast(payload, src=0, group=self.group)
            self.bytes_broadcast += 8 * n
        self._last_send = time.monotonic()

    def _flush_frees(self) -> None:
        while self._frees:
            self._send(FREE_CACHE, self._frees.popleft())

    def check(self) -> None:
        if self.failure is None:
            gone = self._worker_status()
            if gone:
                self._fail(None, gone)
        if self.failure is not None:
            raise WorkerFailure(self.failure)

    def new_cache(self, num_blocks: int, block_size: int) -> int:
        """Every worker allocates a cache pool like rank 0's; a worker that cannot is named in the error."""
        with self._lock:
            self.check()
            cache_id = self._next_id
            self._next_id += 1
            try:
                self._flush_frees()
                self._send(NEW_CACHE, cache_id, num_blocks, block_size)
                flags = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
                dist.all_gather(flags, torch.zeros(1, dtype=torch.int64), group=self.group)
            except Exception as e:
                raise self._fail(e) from e
            bad = [r for r, f in enumerate(flags) if int(f)]
            if bad:
                msgs = "; ".join(f"rank {r}: {self._store_get(f'err{r}') or 'failed'}" for r in bad)
                raise MemoryError(f"tensor-parallel cache of {num_blocks} blocks could not be allocated ({msgs})")
            return cache_id

    def warm_up(self, cache_id: int, local: ModelRunner, limits: WarmUpLimits,
                log: Callable[[str], None] | None) -> list[int]:
        """Every rank warms its runner of this pool with the same limits at once (`ModelRunner.warm_up`: the same
        step shapes in the same order, so their collectives line up; CUDA graphs captured together, so a replay
        on rank 0 meets the same replay on every worker) -> the number of decode graphs each rank holds."""
        with self._lock:
            self.check()
            try:
                self._flush_frees()
                self._send(WARM_UP, cache_id, payload=limits.encode())
                limits.run(local, log)
                mine = torch.tensor([local.graph_count], dtype=torch.int64)
                counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
                dist.all_gather(counts, mine, group=self.group)
            except Exception as e:
                raise self._fail(e) from e
            return [int(c) for c in counts]

    def release(self, cache_id: int) -> None:
        self._frees.append(cache_id)  # sent before the next command (this may run in a finalizer)

    def run(self, cache_id: int, seqs: Sequence[ScheduledSeq], all_logits: bool, local: ModelRunner,
            encoder: StepEncoder, keep_hidden: bool = False) -> torch.Tensor:
        with self._lock:
            self.check()
            payload = encoder.encode(seqs)  # a bad step raises ValueError here: nothing sent, nothing recorded
            try:
                self._flush_frees()
                self._send(RUN, cache_id, len(seqs), int(all_logits) | int(keep_hidden) << 1, payload)
                return local.run(seqs, all_logits, keep_hidden)
            except Exception as e:
                raise self._fail(e) from e

    def draft(self, cache_id: int, seqs: Sequence[ScheduledSeq], hidden_rows: Sequence[int], chained: bool,
              local: ModelRunner, encoder: StepEncoder) -> torch.Tensor:
        with self._lock:
            self.check()
            payload = torch.cat((torch.tensor(list(hidden_rows), dtype=torch.int64), encoder.encode(seqs)))
            try:
                self._flush_frees()
                self._send(DRAFT, cache_id, len(seqs), int(chained) | len(hidden_rows) << 1, payload)
                return local.draft(seqs, hidden_rows, chained)
            except Exception as e:
                raise self._fail(e) from e

    # -- failure -------------------------------------------------------------------------------------
    def _store_get(self, key: str) -> str | None:
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store lives on rank 0; a broken one just says nothing
            return None

    def _diagnose(self) -> dict[int, str]:
        """rank -> what happened to it, from exits, errors the ranks wrote, and stale heartbeats."""
        deadline = time.monotonic() + 2.0
        gone = self._worker_status()
        while not gone and time.monotonic() < deadline:  # a killed peer's exit may trail its closed socket
            time.sleep(0.05)
            gone = self._worker_status()
        for r in range(1, self.world_size):
            err = self._store_get(f"err{r}")
            if err and r not in gone:
                gone[r] = err
            beat = self._store_get(f"hb{r}")
            if r not in gone and beat is not None and time.time() - float(beat) > 4 * HEARTBEAT_S + 1:
                gone[r] = f"stopped responding (last heartbeat {time.time() - float(beat):.0f} s ago)"
        return gone

    def _fail(self, exc: BaseException | None, gone: dict[int, str] | None = None) -> WorkerFailure:
        if self.failure is None:
            gone = gone or self._diagnose()
            if gone:
                who = "; ".join(f"tensor-parallel rank {r} {why}" for r, why in sorted(gone.items()))
            else:
                who = f"a tensor-parallel collective failed or timed out after {self.timeout_s:.0f} s"
            cause = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc else ""
            self.failure = f"{who}{cause}; the model cannot serve any more, restart the server"
            log.error(self.failure)
            self._stop_workers()
        return WorkerFailure(self.failure)

    def _keep_alive(self) -> None:
        interval = max(0.2, min(5.0, self.timeout_s / 4))
        while not self._closed.wait(min(interval, 0.5)):
            if self.failure is not None:
                return
            if not self._lock.acquire(blocking=False):
                continue  # a step is running: that is traffic enough
            try:
                if self._closed.is_set() or self.failure is not None:
                    return
                gone = self._worker_status()
                if gone:
                    self._fail(None, gone)
                elif time.monotonic() - self._last_send >= interval:
                    self._flush_frees()
                    self._send(NOOP)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            finally:
                self._lock.release()

    def close(self, wait_s: float = 10.0) -> None:
        """Stop every worker (a STOP command, then termination of what is left)."""
        self._closed.set()
        with self._lock:
            if self.failure is None:
                try:
                    self._send(STOP)
                except Exception:  # noqa: BLE001 - they are being stopped anyway
                    pass
        self._keepalive.join(timeout=2)


@dataclass(frozen=True)
class WarmUpLimits:
    """`ModelRunner.warm_up`'s arguments as every rank receives them. `eager_graph`: cuda_graphs.EagerGraph stands
    in for CUDA graphs (CPU tests); no other graph type crosses processes."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_context: int
    enforce_eager: bool
    force: bool | None
    eager_graph: bool

    def encode(self) -> torch.Tensor:
        force = -1 if self.force is None else int(self.force)
        return torch.tensor([self.max_num_seqs, self.max_num_batched_tokens, self.max_context,
                             int(self.enforce_eager), force, int(self.eager_graph)], dtype=torch.int64)

    @classmethod
    def decode(cls, payload: torch.Tensor) -> WarmUpLimits:
        seqs, tokens, context, eager, force, eager_graph = payload.tolist()
        return cls(seqs, tokens, context, bool(eager), None if force < 0 else bool(force), bool(eager_graph))

    def run(self, runner: ModelRunner, log: Callable[[str], None] | None) -> None:
        from deepseek_mcp.inference.engine.cuda_graphs import EagerGraph

        runner.warm_up(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                       max_context=self.max_context, enforce_eager=self.enforce_eager, force=self.force, log=log,
                       graph=EagerGraph if self.eager_graph else None)


class DistributedRunner:
    """`ModelRunner.run` across the ranks: one cache pool per rank (the latent cache, replicated)."""

    def __init__(self, local: ModelRunner, plane: ControlPlane):
        self.local, self.plane = local, plane
        self.num_blocks, self.block_size = local.num_blocks, local.block_size
        self.cache_id = plane.new_cache(local.num_blocks, local.block_size)
        self.encoder = StepEncoder(local.num_blocks, local.block_size)  # block tables as deltas (step_codec.py)
        self.graphs_per_rank: list[int] | None = None  # after warm_up: decode graphs each rank captured
        weakref.finalize(self, plane.release, self.cache_id)

    @property
    def graphs(self) -> object | None:
        return self.local.graphs

    def warm_up(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_context: int,
                enforce_eager: bool = False, force: bool | None = None,
                log: Callable[[str], None] | None = None, graph: type | None = None) -> None:
        """`ModelRunner.warm_up` on every rank at once (progress on rank 0's `log`; the workers are quiet): kernels
        compiled and tuned for the pool's shapes, then the decode CUDA graphs captured on every rank together.
        By default only on the Triton path on CUDA, as on one device; `graph` None or cuda_graphs.EagerGraph."""
        from deepseek_mcp.inference.engine.cuda_graphs import EagerGraph

        if graph not in (None, EagerGraph):
            raise ValueError("under tensor parallelism warm_up takes graph=None or cuda_graphs.EagerGraph")
        if not self.local.warms(force):
            return  # nothing to do on any rank: no message sent
        limits = WarmUpLimits(max_num_seqs, max_num_batched_tokens, max_context, enforce_eager, force,
                              graph is EagerGraph)
        self.graphs_per_rank = self.plane.warm_up(self.cache_id, self.local, limits, log)

    @property
    def cache_tokens(self) -> int:
        return self.local.cache_tokens

    @property
    def has_mtp(self) -> bool:
        return self.local.has_mtp

    def run(self, seqs: Sequence[ScheduledSeq], all_logits: bool = False, keep_hidden: bool = False) -> torch.Tensor:
        return self.plane.run(self.cache_id, seqs, all_logits, self.local, self.encoder, keep_hidden)

    def draft(self, seqs: Sequence[ScheduledSeq], hidden_rows: Sequence[int], chained: bool = False) -> torch.Tensor:
        """`ModelRunner.draft` on every rank (the MTP layer is split like the main model's blocks)."""
        return self.plane.draft(self.cache_id, seqs, hidden_rows, chained, self.local, self.encoder)


def worker_loop(rank: int, model: Any, control_group: Any, store: Any, device: torch.device,
                dtype: torch.dtype) -> None:
    """A worker rank: run the commands rank 0 broadcasts until STOP. An error is written to the store (rank 0
    names it) and raised."""
    cfg = model.cfg
    caches: dict[int, ModelRunner] = {}
    decoders: dict[int, StepDecoder] = {}  # per cache: the live block lists rank 0 sends as deltas
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                store.set(f"hb{rank}", str(time.time()))
            except Exception:  # noqa: BLE001 - rank 0 is gone; the main loop finds out
                return

    store.set(f"hb{rank}", str(time.time()))
    threading.Thread(target=beat, name="tp-heartbeat", daemon=True).start()
    message = torch.zeros(MESSAGE, dtype=torch.int64)
    try:
        while True:
            dist.broadcast(message, src=0, group=control_group)
            cmd, cache_id, a, b, n = message[:HEADER].tolist()
            if n <= MESSAGE - HEADER:
                payload = message[HEADER : HEADER + n].clone()
            else:
                payload = torch.empty(n, dtype=torch.int64)
                dist.broadcast(payload, src=0, group=control_group)
            if cmd == RUN:
                caches[cache_id].run(decoders[cache_id].decode(payload, a), bool(b & 1), bool(b & 2))
            elif cmd == DRAFT:
                rows = b >> 1
                caches[cache_id].draft(decoders[cache_id].decode(payload[rows:], a), payload[:rows].tolist(),
                                       bool(b & 1))
            elif cmd == NEW_CACHE:
                flag = torch.zeros(1, dtype=torch.int64)
                try:
                    caches[cache_id] = ModelRunner(model, cfg, a, b, device, dtype)
                    decoders[cache_id] = StepDecoder()
                except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
                    store.set(f"err{rank}", f"{type(e).__name__}: {e}")
                    flag += 1
                dist.all_gather([torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(
                    control_group))], flag, group=control_group)
            elif cmd == WARM_UP:  # the same steps as rank 0, in the same order; then report the graphs
                runner = caches[cache_id]
                WarmUpLimits.decode(payload).run(runner, log=lambda line: None)
                mine = torch.tensor([runner.graph_count], dtype=torch.int64)
                dist.all_gather([torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(
                    control_group))], mine, group=control_group)
            elif cmd == FREE_CACHE:
                caches.pop(cache_id, None)
                decoders.pop(cache_id, None)
            elif cmd == STOP:
                return
    except Exception as e:
        try:
            store.set(f"err{rank}", f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        stop.set()
