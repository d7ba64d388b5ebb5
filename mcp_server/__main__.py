"""`deepseek-mcp` / `python -m deepseek_mcp.mcp_server`: serve a local DeepSeek-V3.1 over MCP (stdio by default)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from typing import Any

import anyio
import anyio.abc

from deepseek_mcp.mcp_server.config import (
    CONFIG_ENV,
    TOKEN_ENV,
    ConfigError,
    ServerConfig,
    check_serving_security,
    config_warnings,
    load_config,
    printable,
)
from deepseek_mcp.mcp_server.log_format import setup_logging

log = logging.getLogger("deepseek-mcp")

EPILOG = f"""\
Configuration: a JSON file (--config, or ${CONFIG_ENV}) with the keys of config.example.json; unknown keys are
errors. ${TOKEN_ENV} sets the bearer token. Command-line flags override both.

Examples:
  deepseek-mcp                                    demo checkpoint over stdio (for MCP clients)
  deepseek-mcp --model /models/DeepSeek-V3.1      a real checkpoint
  deepseek-mcp --transport http --port 8000       streamable HTTP at http://127.0.0.1:8000/mcp
  deepseek-mcp --transport http --host 0.0.0.0 --token SECRET   beyond loopback (token required)
  deepseek-mcp --model /models/DeepSeek-V3.1 --tensor-parallel-size 8     8 GPUs on this machine
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT -m deepseek_mcp.mcp_server --model ...   two nodes
  deepseek-mcp plan --model deepseek-ai/DeepSeek-V3.1 --tensor-parallel-size 8 --gpu-memory-gib 139
"""


STDIO_ON_A_TERMINAL = """\
deepseek-mcp: serving MCP over stdio. It now waits for an MCP client on stdin: this is not an interactive
prompt. Let your MCP client start this command (client configuration: "Use from MCP clients" in README.md),
or serve HTTP with --transport http. Ctrl-C stops it."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepseek-mcp")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepseek-mcp", description="MCP server for a local DeepSeek-V3.1 (chat, think, tool_call).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="PATH", help=f"JSON configuration file (default: ${CONFIG_ENV})")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and exit (the token only as set or not)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="checkpoint directory or Hugging Face id (default: the demo checkpoint, "
                                   "random weights)")
    m.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="activation dtype")
    m.add_argument("--kernels", choices=["auto", "triton", "torch"],
                   help="which kernels run (default auto: triton on CUDA, else torch)")
    m.add_argument("--cache-tokens", type=int,
                   help="KV cache capacity in tokens (default: 8192 per sequence of --max-num-seqs, within free "
                        "memory); it also caps the context a call can use (list_models: context_tokens)")
    m.add_argument("--max-num-seqs", type=int, help="most requests decoded together (default 16)")
    m.add_argument("--enforce-eager", dest="enforce_eager", action="store_const", const=True,
                   help="run decode steps eagerly: no CUDA graphs")
    m.add_argument("--tensor-parallel-size", type=int, metavar="N", help="split the model over N ranks: N-1 "
                   "worker processes on this machine, one per GPU (under torchrun: its world size)")
    m.add_argument("--dist-timeout", type=float, metavar="SECONDS", help="timeout of every collective between "
                   "the ranks; a rank that dies or hangs fails the calls naming it (default 300)")
    m.add_argument("--speculative-tokens", type=int, metavar="K",
                   help="speculative decoding with the checkpoint's multi-token-prediction layer: K = 1..3 draft "
                        "tokens per decode step, verified in one forward (same tokens; the layer's weights and "
                        "one more cache layer load; default 0 = off)")
    m.add_argument("--no-constrained-decoding", dest="constrained_decoding", action="store_const", const=False,
                   help="sample tool calls and response_format output without the grammar (default: constrained)")
    m.add_argument("--trusted-control-tokens", dest="trusted_control_tokens", action="store_const", const=True,
                   help="encode control-token text in messages (e.g. '<｜User｜>') as control tokens, as the "
                        "official template does; only for clients whose every message is trusted (default: text)")
    s = p.add_argument_group("defaults and limits")
    s.add_argument("--temperature", type=float, help="default temperature (default 0.6; 0 = greedy)")
    s.add_argument("--top-p", type=float, help="default top_p (default 0.95)")
    s.add_argument("--top-k", type=int, help="default top_k (default 0 = off)")
    s.add_argument("--max-tokens", type=int, help="default max_tokens per call (default 512)")
    s.add_argument("--thinking-budget", type=int, help="default reasoning budget for think (default max_tokens/2)")
    s.add_argument("--max-wall-time", type=float, metavar="SECONDS",
                   help="generation time limit per call, counted from admission (time queued is not counted); "
                        "returns what it has with finish_reason 'time', an error if nothing yet (default 50)")
    s.add_argument("--load-wait", type=float, metavar="SECONDS",
                   help="how long a call waits for a model still loading (default 600)")
    s.add_argument("--max-conversations", type=int, help="stored conversations kept, and as many "
                   "stored /v1/responses (default 256)")
    s.add_argument("--max-waiting", type=int, help="requests that may queue for a batch slot; more are refused "
                                                   "at once (HTTP 429) (default 256)")
    s.add_argument("--max-conversation-tokens", type=int, metavar="TOKENS",
                   help="tokens all stored conversations hold together; least recently used go (default 1000000)")
    t = p.add_argument_group("transport")
    t.add_argument("--transport", choices=["stdio", "http", "sse"], help="default stdio")
    t.add_argument("--host", help="HTTP/SSE bind address (default 127.0.0.1)")
    t.add_argument("--port", type=int, help="HTTP/SSE port (default 8000)")
    t.add_argument("--path", help="streamable HTTP endpoint path (default /mcp)")
    t.add_argument("--token", help=f"bearer token for HTTP/SSE; required beyond loopback (or ${TOKEN_ENV})")
    t.add_argument("--allowed-host", action="append", metavar="HOST[:PORT]",
                   help="extra accepted Host header (repeatable; 'name:*' for any port)")
    t.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                   help="extra accepted Origin header, e.g. https://app.example (repeatable)")
    t.add_argument("--keep-alive-timeout", type=float, metavar="SECONDS",
                   help="close an idle keep-alive HTTP connection after this (default 5)")
    t.add_argument("--header-timeout", type=float, metavar="SECONDS",
                   help="close a connection whose request headers take longer than this (default 10)")
    t.add_argument("--max-header-bytes", type=int, metavar="BYTES",
                   help="largest HTTP request head (request line and headers); larger is a 400 (default 16384)")
    t.add_argument("--body-timeout", type=float, metavar="SECONDS",
                   help="answer 408 and close a connection whose request body takes longer than this (default 60)")
    t.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests under way (MCP tool calls over stdio too) may finish "
                        "before their streams end with an error event, tool calls with an error result (default 1; "
                        "the process exits within this plus 1 s)")
    a = p.add_argument_group("OpenAI / Anthropic API")
    a.add_argument("--api-port", type=int, metavar="PORT",
                   help="serve /v1/* on this port too (e.g. beside a stdio MCP server); with --transport http "
                        "the API is always on --port")
    a.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="model names the API answers to (default: the checkpoint's name, plus the aliases "
                        "deepseek-chat and deepseek-reasoner)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="stderr log lines as text (default) or one JSON object per line, for log shippers")
    return p


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, shaped like the configuration file."""
    flat = {"model": args.model, "device": args.device, "dtype": args.dtype, "kernels": args.kernels,
            "cache_tokens": args.cache_tokens, "max_num_seqs": args.max_num_seqs,
            "enforce_eager": args.enforce_eager,
            "tensor_parallel_size": args.tensor_parallel_size, "dist_timeout_s": args.dist_timeout,
            "speculative_tokens": args.speculative_tokens, "constrained_decoding": args.constrained_decoding,
            "trusted_control_tokens": args.trusted_control_tokens, "transport": args.transport,
            "host": args.host, "port": args.port, "path": args.path, "token": args.token,
            "allowed_hosts": args.allowed_host, "allowed_origins": args.allowed_origin, "log_level": args.log_level,
            "log_format": args.log_format,
            "api_port": args.api_port, "served_model_names": args.served_model_name}
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    limits = {"max_tokens": args.max_tokens, "thinking_budget": args.thinking_budget,
              "max_wall_time_s": args.max_wall_time, "load_wait_s": args.load_wait,
              "max_conversations": args.max_conversations, "max_waiting": args.max_waiting,
              "max_conversation_tokens": args.max_conversation_tokens,
              "keep_alive_timeout_s": args.keep_alive_timeout, "header_timeout_s": args.header_timeout,
              "max_header_bytes": args.max_header_bytes,
              "body_timeout_s": args.body_timeout, "shutdown_grace_s": args.shutdown_grace}
    out: dict[str, Any] = {k: v for k, v in flat.items() if v is not None}
    for key, section in (("sampling", sampling), ("limits", limits)):
        given = {k: v for k, v in section.items() if v is not None}
        if given:
            out[key] = given
    return out


# After SIGINT/SIGTERM and the HTTP drain's grace period (limits.shutdown_grace_s): how long the drain and the
# transport get to stop on their own before they are cancelled, and when the process exits regardless.
_STOP_AFTER_GRACE_S = 0.6
_EXIT_AFTER_GRACE_S = 0.8
_EXIT_AT_LEAST_S = 1.8


async def _stop_on_signal(stop: anyio.Event, scope: anyio.CancelScope, received: list[int], grace_s: float,
                          exit_s: float, *,
                          task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """On SIGINT or SIGTERM: set `stop` (HTTP drains its requests and closes its connections), then cancel
    `scope` after `grace_s`; the process exits `exit_s` after the signal whatever blocks. A second signal cancels
    at once."""
    try:
        receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        signals = receiver.__enter__()
    except NotImplementedError:  # Windows' event loop: Ctrl-C still raises KeyboardInterrupt
        task_status.started()
        return
    try:
        task_status.started()
        async for signum in signals:
            received.append(signum)
            log.info("%s received: stopping the server and freeing the model", signal.Signals(signum).name)
            # whatever blocks the orderly stop (a model step or load in native code), the process ends in time
            deadline = threading.Timer(exit_s, _exit_now, args=(128 + signum,))
            deadline.daemon = True
            deadline.start()
            stop.set()
            with anyio.move_on_after(grace_s):
                async for _ in signals:
                    break
            break
    finally:
        receiver.__exit__(None, None, None)
    scope.cancel()


async def serve(config: ServerConfig) -> int:
    """Serve until the transport ends (stdin closes) or a signal arrives; the exit status (128 + signal)."""
    from deepseek_mcp.mcp_server.api.app import ApiApp, serve_api
    from deepseek_mcp.mcp_server.model_host import ModelHost
    from deepseek_mcp.mcp_server.server import build_server
    from deepseek_mcp.mcp_server.service import ChatService
    from deepseek_mcp.mcp_server.shutdown import Drain
    from deepseek_mcp.mcp_server.transports import serve_http, serve_stdio

    host = ModelHost(config)
    service = ChatService(host, config)
    drain = Drain(config.limits.shutdown_grace_s)  # the graceful stop of the HTTP requests and tool calls
    mcp = build_server(service, drain)
    api = ApiApp(service, drain)
    received: list[int] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        # HTTP requests and tool calls (stdio too) get the grace period (mcp_server/shutdown.py)
        drain_s = config.limits.shutdown_grace_s
        await tg.start(functools.partial(_stop_on_signal, stop, tg.cancel_scope, received,
                                         drain_s + _STOP_AFTER_GRACE_S,
                                         max(drain_s + _EXIT_AFTER_GRACE_S, _EXIT_AT_LEAST_S)))
        async with host.running(), anyio.create_task_group() as inner:  # leaving it stops the engine
            if config.api_port is not None and (config.transport == "stdio" or config.api_port != config.port):
                inner.start_soon(serve_api, api, config.api_port, stop)
            if config.transport == "stdio":  # on a signal: drains, then ends stdin as if the client closed it
                await serve_stdio(mcp, stop, api.drain)
            else:
                await serve_http(mcp, config, stop, wrap=api.mount, drain=api.drain)
            inner.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    if received:
        log.info("stopped")
    return 128 + received[0] if received else 0


def run_rank(config: ServerConfig) -> int:
    """A torchrun rank other than 0: no front end, only this rank's part of the model, driven by rank 0."""
    from deepseek_mcp.inference.engine.engine import Engine

    os.dup2(2, 1)  # torchrun gives every rank the same stdout, which carries rank 0's protocol
    return Engine.run_rank(config.model, config.device, config.dtype, kernels=config.kernels,
                           dist_timeout_s=config.dist_timeout_s, speculative_tokens=config.speculative_tokens)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        from deepseek_mcp.inference.model.plan import main as plan_main

        return plan_main(argv[1:], prog="deepseek-mcp plan")
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, overrides(args))
        check_serving_security(config)
    except ConfigError as e:
        print(f"deepseek-mcp: {e}", file=sys.stderr)
        return 2
    for warning in config_warnings(config):
        print(f"deepseek-mcp: warning: {warning}", file=sys.stderr)
    if args.print_config:
        print(printable(config))
        return 0
    setup_logging(config.log_level, config.log_format)
    from deepseek_mcp.inference.engine.launch import torchrun_rank

    if torchrun_rank() > 0:
        return run_rank(config)
    try:
        import torch  # noqa: F401 - load the heavy native libraries before the event loop starts serving

        if config.transport == "stdio" and sys.stdin.isatty():
            print(STDIO_ON_A_TERMINAL, file=sys.stderr)
        code = anyio.run(serve, config)
    except KeyboardInterrupt:  # before the signal handler is installed
        _exit_now(130)
    except Exception:
        log.exception("deepseek-mcp stopped on an unexpected error")
        return 1
    if code >= 128:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """After a signal stop (serving ended, the engine closed): exit without the interpreter's teardown, which
    would wait on a model still loading in its thread (or abort in native code) and spend seconds freeing
    tensors the OS frees at once."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
