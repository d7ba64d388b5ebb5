"""`python -m inference generate --model PATH --prompt TEXT`: a quick generation from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--model", default=None, help="checkpoint directory or Hugging Face repo id "
                     "(default: the demo checkpoint with random weights)")
    gen.add_argument("--prompt", required=True, help="user message")
    gen.add_argument("--system", default=None, help="optional system prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.add_argument("--thinking", action="store_true", help="thinking mode (the prompt ends with <think>)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    gen.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    from inference.engine.engine import Engine
    from inference.engine.sampling import SamplingParams

    try:
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                       dequantize_fp8="auto")
        load_s = time.perf_counter() - t0
        if args.raw:
            ids = engine.tokenizer.encode(args.prompt)
        else:
            from inference.text.template import render_ids

            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": args.prompt})
            ids = render_ids(messages, engine.tokenizer, thinking=args.thinking)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens)
        t1 = time.perf_counter()
        out = engine.generate([ids], params)[0]
        gen_s = time.perf_counter() - t1
    except (ValueError, OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if engine.is_demo:
        print(f"[{engine.name}: the demo checkpoint has random weights, so its text is noise]", file=sys.stderr)
    print(out.text)
    print(f"[{engine.name} on {engine.device} ({engine.dtype}, {engine.backend} kernels): loaded in {load_s:.1f}s; "
          f"{len(ids)} prompt tokens, {len(out.token_ids)} generated in {gen_s:.2f}s, finish_reason="
          f"{out.finish_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
