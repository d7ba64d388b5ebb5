"""Model lifecycle: load once per process in the background, then serve through one AsyncEngine.

The load (minutes for a real checkpoint) runs in a daemon thread, so the protocol answers at once and a process
asked to exit never waits for it. Calls that arrive meanwhile wait in `wait_ready`, reporting load progress; a
failed load leaves the cause in `error`, returned by every call.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio

from deepseek_mcp.inference.model.demo import DEMO_NAME
from deepseek_mcp.inference.text.bounded import PromptTooLong
from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.failures import RequestError
from deepseek_mcp.mcp_server.progress import Progress

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]
T = TypeVar("T")


class ModelUnavailable(RuntimeError):
    """The model failed to load, or is still loading past the wait limit; the message says which and why."""


def display_name(model: str | None) -> str:
    if model is None:
        return DEMO_NAME
    path = Path(model).expanduser()
    return path.name if path.exists() else model  # local directory -> its name; HF id -> as given


def default_loader(config: ServerConfig) -> Callable[[], Any]:
    def load() -> Any:
        from deepseek_mcp.inference.engine.engine import Engine
        from deepseek_mcp.inference.model.plan import check_before_load

        check_before_load(config.model, config.tensor_parallel_size, config.device, config.dtype,
                          max_num_seqs=config.max_num_seqs, cache_tokens=config.cache_tokens,
                          mtp=config.speculative_tokens > 0)  # refuse before loading

        def from_pretrained() -> Any:
            return Engine.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                          kernels=config.kernels, tensor_parallel_size=config.tensor_parallel_size,
                                          dist_timeout_s=config.dist_timeout_s, dequantize_fp8="auto",
                                          speculative_tokens=config.speculative_tokens)

        return from_pretrained() if config.model is not None else logging_demo_write(from_pretrained)

    return load


def logging_demo_write(load: Callable[[], Any]) -> Any:
    """Run `load` (of the demo checkpoint), logging where the demo is written, and its size, on first use."""
    from deepseek_mcp.inference.model.demo import DEMO_VERSION
    from deepseek_mcp.inference.resources import default_cache_dir

    target = default_cache_dir() / f"demo-{DEMO_VERSION}"
    first = not (target / "model.safetensors.index.json").is_file()  # demo_checkpoint_path's test
    if first:
        log.info("first run: writing the demo checkpoint (random weights) to %s", target)
    started = time.monotonic()
    engine = load()
    if first and target.is_dir():
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        log.info("wrote the demo checkpoint to %s: %.2f GB in %.1f s (delete it to reclaim the space)", target,
                 size / 1e9, time.monotonic() - started)
    return engine


def default_async_engine(config: ServerConfig) -> Callable[[Any], Any]:
    def make(engine: Any) -> Any:
        from deepseek_mcp.inference.engine.async_engine import AsyncEngine

        return AsyncEngine(engine, max_num_seqs=config.max_num_seqs, cache_tokens=config.cache_tokens,
                           max_waiting=config.limits.max_waiting, enforce_eager=config.enforce_eager)

    return make


class ModelHost:
    """Owns the Engine and the AsyncEngine. Use `async with host.running():` around serving."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        loader: Callable[[], Any] | None = None,
        make_async_engine: Callable[[Any], Any] | None = None,
    ) -> None:
        self.config = config
        self.name = display_name(config.model)
        self.source = config.model or "demo"
        self.demo = config.model is None
        self._loader = loader or default_loader(config)
        self._make_async_engine = make_async_engine or default_async_engine(config)
        self.status: Status = "loading"
        self.error: str | None = None
        self.failed_at_runtime = False  # "failed" after a successful load (a dead rank, the engine loop)
        self.engine: Any = None
        self.aengine: Any = None
        self.load_started = time.monotonic()
        self.load_seconds: float | None = None
        self._future: concurrent.futures.Future[Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Start the load thread (idempotent). Call early: the load overlaps the protocol handshake."""
        if self._future is not None:
            return
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._future = future
        self.load_started = time.monotonic()

        def work() -> None:
            try:
                future.set_result(self._loader())
            except Exception as e:  # reported to every caller as the load failure
                future.set_exception(e)

        threading.Thread(target=work, name="deepseek-mcp-load", daemon=True).start()
        log.info("loading model %s in the background", self.source)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ModelHost]:
        """Load (in the background) and serve; on exit the AsyncEngine stops and its requests end."""
        self.start_loading()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._supervise)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _supervise(self) -> None:
        assert self._future is not None
        while not self._future.done():
            await anyio.sleep(0.05)
        try:
            engine = self._future.result()
            self.engine = engine
            aengine = await anyio.to_thread.run_sync(self._make_async_engine, engine)  # warms kernels: off the loop
            async with aengine:
                self.aengine = aengine
                self.load_seconds = time.monotonic() - self.load_started
                self.status = "ready"
                log.info("model %s ready after %.1f s", self.name, self.load_seconds)
                while not isinstance(getattr(engine, "failure", None), str):  # a tensor-parallel rank died/hung
                    await anyio.sleep(0.1)
                self._failed_while_serving(engine.failure)
        except Exception as e:  # the load, or the AsyncEngine's start, failed; or its loop, while serving
            if self.status == "ready":
                self._failed_while_serving(f"the engine loop stopped: {_cause(e)}")
            else:
                self.error = _cause(e)
                self.status = "failed"
                log.error("model %s failed to load: %s", self.source, self.error)
        finally:
            if self.status == "ready":
                self.status = "failed"
                self.error = "the server is shutting down"
            self.aengine = None
            close = getattr(self.engine, "close", None)
            if close is not None:  # stops tensor-parallel workers (a no-op on one device)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(close)

    def _failed_while_serving(self, cause: str) -> None:
        self.status, self.failed_at_runtime = "failed", True
        self.error = f"the engine failed while serving, after a successful load: {cause}"
        log.error("model %s: %s", self.name, self.error)

    def failure_message(self) -> str:
        """What a call is told once the model failed (at load, or later while serving), with what to do."""
        if self.failed_at_runtime:
            return (f"the model {self.name} stopped serving: {self.error}. Restart the server (GET /health and "
                    "list_models report it)")
        return (f"the model {self.source} failed to load: {self.error}. Fix the model configuration (model, "
                "device, dtype, kernels) and restart the server")

    # -- capacity -------------------------------------------------------------------------------------

    def cache_capacity_tokens(self) -> int | None:
        return getattr(self.aengine, "cache_capacity_tokens", None) if self.aengine is not None else None

    def context_tokens(self) -> int:
        """Longest prompt + max_tokens one request can use: the model's context, capped by the KV cache (the
        AsyncEngine's max_model_len, the one number every check and report uses)."""
        limit = getattr(self.aengine, "max_model_len", None)
        return int(limit) if limit else int(self.engine.max_context)

    def context_limit(self) -> str:
        """Where context_tokens comes from, in words."""
        model_context = int(self.engine.max_context)
        if self.context_tokens() < model_context:
            return (f"capped by the KV cache ({self.cache_capacity_tokens()} tokens; --cache-tokens raises it) "
                    f"below the model's {model_context}-token context (max_position_embeddings)")
        return "the model's context (max_position_embeddings)"

    def too_long(self, num_prompt_tokens: int, *, at_least: bool = False) -> RequestError:
        """The answer to a prompt the context cannot take (`at_least`: its encoding stopped past the limit)."""
        size = f"at least {num_prompt_tokens}" if at_least else f"{num_prompt_tokens}"
        return RequestError(f"the prompt is {size} tokens but the context holds {self.context_tokens()} "
                            f"({self.context_limit()}); shorten the prompt or messages, or start a new "
                            "conversation (omit conversation_id)")

    async def tokenize(self, encode: Callable[[int], T]) -> T:
        """`encode(limit)` on a worker thread (a long prompt never holds up the event loop), `limit` the longest
        prompt the context takes; an encoding that stops past it (PromptTooLong, inference/text/bounded.py) is
        answered as a prompt too long, with the tokens it counted."""
        try:
            return await anyio.to_thread.run_sync(encode, self.context_tokens() - 1)
        except PromptTooLong as e:
            err = self.too_long(e.num_tokens, at_least=True)
            raise (RequestError(f"{e.where}: {err}") if e.where else err) from None

    # -- waiting --------------------------------------------------------------------------------------

    def load_elapsed(self) -> float:
        return time.monotonic() - self.load_started

    async def wait_ready(self, progress: Progress | None = None, *, timeout_s: float | None = None) -> Any:
        """The AsyncEngine, once the model is loaded; reports load progress meanwhile."""
        progress = progress or Progress()
        timeout_s = self.config.limits.load_wait_s if timeout_s is None else timeout_s
        interval = self.config.limits.progress_interval_s
        waited = time.monotonic()
        while self.status == "loading":
            elapsed = time.monotonic() - waited
            if elapsed >= timeout_s:
                raise ModelUnavailable(
                    f"the model {self.name} is still loading ({self.load_elapsed():.0f} s so far); retry the "
                    "call in a little while, or call list_models to see its status"
                )
            await progress.update(0, None, f"loading model {self.name} ({self.load_elapsed():.0f} s elapsed)")
            with anyio.move_on_after(min(interval, timeout_s - elapsed)):
                while self.status == "loading":
                    await anyio.sleep(0.05)
        if self.status == "failed":
            raise ModelUnavailable(self.failure_message())
        return self.aengine


def _cause(exc: BaseException) -> str:
    """An exception in one line; an ExceptionGroup (a task group's) by its first leaf."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"
