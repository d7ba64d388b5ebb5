"""`python -m deepseek_mcp.inference generate --model PATH --prompt TEXT`: a quick generation from the command line.

The text streams to stdout as it decodes; with `--thinking` the reasoning and the answer come under their own
headings. Timings and the model's description go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepseek-mcp")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _DeprecatedAlias(argparse.Action):
    """`--backend`: the old name of `--kernels` (the server's flag); still accepted, with a warning."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"warning: {option_string} is deprecated; use --kernels (the same flag as deepseek-mcp's)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepseek_mcp.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt",
                         description="Generate a completion for one prompt, streamed as it decodes.")
    gen.add_argument("--model", default=None, help="checkpoint directory or Hugging Face repo id "
                     "(default: the demo checkpoint with random weights)")
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--system", default=None, help="optional system prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.add_argument("--thinking", action="store_true",
                     help="thinking mode: the model reasons first; the reasoning and the answer are printed "
                          "under separate headings")
    gen.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    gen.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                     help="which kernels run, as deepseek-mcp --kernels (default auto: triton on CUDA, else torch)")
    gen.add_argument("--enforce-eager", action="store_true",
                     help="run decode steps eagerly: no CUDA graphs (as deepseek-mcp --enforce-eager)")
    gen.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                     help="split the model over N ranks: N-1 worker processes here, one per GPU (or CPU + gloo)")
    gen.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                     help="draft K = 1..3 tokens per step with the checkpoint's MTP layer, verified in one forward "
                          "(the same tokens; as deepseek-mcp --speculative-tokens)")
    gen.add_argument("--backend", dest="kernels", choices=["auto", "torch", "triton"], action=_DeprecatedAlias,
                     help="deprecated alias of --kernels")
    return parser


class _Printer:
    """Streams parsed output to stdout; in thinking mode, under a heading per part."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.part: str | None = None

    def write(self, part: str, text: str) -> None:
        if not text:
            return
        if self.thinking and part != self.part:
            sys.stdout.write(("\n" if self.part else "") + f"--- {part} ---\n")
        self.part = part
        sys.stdout.write(text)
        sys.stdout.flush()

    def events(self, events: list[Any]) -> None:
        from deepseek_mcp.inference.text.parse import ContentDelta, ReasoningDelta

        for event in events:
            if isinstance(event, ReasoningDelta):
                self.write("reasoning", event.text)
            elif isinstance(event, ContentDelta):
                self.write("answer", event.text)


async def _stream(engine: Any, ids: list[int], params: Any, printer: _Printer, raw: bool,
                  enforce_eager: bool = False) -> tuple[Any, float]:
    """Decode through the serving engine (one request, a cache just big enough) so text arrives per token.
    -> (last output, seconds the engine took to start: its kernel warm-up and CUDA graphs, load time)."""
    from deepseek_mcp.inference.engine.async_engine import AsyncEngine
    from deepseek_mcp.inference.text.parse import StreamParser

    parser = StreamParser(thinking=printer.thinking)
    block = 16
    cache_tokens = -(-(len(ids) + params.max_tokens + 1) // block) * block
    last = None
    t0 = time.perf_counter()
    aengine = AsyncEngine(engine, max_num_seqs=1, cache_tokens=cache_tokens, block_size=block,
                          enforce_eager=enforce_eager)
    warm_s = time.perf_counter() - t0
    async with aengine:
        async for out in aengine.stream(ids, params):
            if raw:
                printer.write("text", out.text_delta)
            else:
                printer.events(parser.feed(out.text_delta))
            last = out
    if not raw:
        printer.events(parser.finish())
    return last, warm_s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    import anyio

    from deepseek_mcp.inference.engine.engine import Engine
    from deepseek_mcp.inference.engine.launch import torchrun_rank
    from deepseek_mcp.inference.engine.sampling import SamplingParams

    if torchrun_rank() > 0:  # torchrun started every rank: those but 0 run the model loop
        return Engine.run_rank(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels,
                               speculative_tokens=args.speculative_tokens)

    engine = None
    try:
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels,
                                        tensor_parallel_size=args.tensor_parallel_size, dequantize_fp8="auto",
                                        speculative_tokens=args.speculative_tokens)
        load_s = time.perf_counter() - t0
        ranks = engine.tensor_parallel_size
        if args.raw:
            ids = engine.tokenizer.encode(args.prompt)
        else:
            from deepseek_mcp.inference.text.template import render_ids

            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": args.prompt})
            ids = render_ids(messages, engine.tokenizer, thinking=args.thinking)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens)
        engine.check_prompt(ids, args.max_tokens)
        if engine.is_demo:
            print(f"[{engine.name}: the demo checkpoint has random weights, so its text is noise]", file=sys.stderr)
        printer = _Printer(args.thinking and not args.raw)
        t1 = time.perf_counter()
        out, warm_s = anyio.run(_stream, engine, ids, params, printer, args.raw, args.enforce_eager)
        gen_s = time.perf_counter() - t1 - warm_s
        load_s += warm_s
    except (ValueError, OSError, MemoryError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.close()  # stops the tensor-parallel workers
    print(flush=True)
    n = len(out.token_ids) if out is not None else 0
    tp = f" x{ranks} ranks" if ranks > 1 else ""
    print(f"[{engine.name} on {engine.device}{tp} ({engine.dtype}, {engine.kernels} kernels): loaded in "
          f"{load_s:.1f}s; {len(ids)} prompt tokens, {n} generated in {gen_s:.2f}s, finish_reason="
          f"{out.finish_reason if out is not None else None}{_drafts(out)}]", file=sys.stderr)
    return 0


def _drafts(out: object) -> str:
    """`, a/b drafts accepted` where the request decoded speculatively."""
    stats = getattr(out, "stats", None)
    if stats is None or not stats.num_drafted:
        return ""
    return f", {stats.num_accepted}/{stats.num_drafted} drafts accepted"


if __name__ == "__main__":
    sys.exit(main())
