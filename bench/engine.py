"""Engine benchmark on the demo checkpoint: ours vs transformers' DeepseekV3ForCausalLM, same weights and dtype.

    python bench/engine.py [--prompt-len 512] [--decode-tokens 32] [--dtype bfloat16]

Each implementation runs in its own subprocess (so peak RSS is its own): prefill tokens/s (one prompt, logits of
the last token; median of 5), decode tokens/s at batch 1 and 8 (greedy, 16-token prompts: the median of every
decode step timed over 3 passes after a warm-up pass; ours through `EngineCore.step`, the loop the server and
`Engine.generate` run; transformers' model called step by step with its KV cache), peak RSS, KV-cache bytes
per token. Transformers reads a dequantized copy of the demo checkpoint (it has no CPU FP8 path); ours is measured
on that same copy (same weights, same dtype), on the FP8 original, and on a 4-bit copy (compressed-tensors
pack-quantized, symmetric, group 128, written by tests/quant_packers.py from the dequantized copy; the torch path
dequantizes the weights each matmul reads, per call). `--skip-hf` leaves transformers out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the references the kernels are checked against


def dequantized_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """The demo checkpoint with every FP8 weight dequantized (no quantization_config)."""
    from reference.fp8 import weight_dequant_torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        with safe_open(str(src / shard), "pt") as f:
            for k in f.keys():
                if k.endswith("weight_scale_inv"):
                    continue
                t = f.get_tensor(k)
                if t.dtype == torch.float8_e4m3fn:
                    t = weight_dequant_torch(t, f.get_tensor(k + "_scale_inv"), 128, dtype)
                out[k] = t
                weight_map[k] = shard
        save_file(out, str(dst / shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def int4_copy(src: Path, dst: Path, group: int = 128) -> Path:
    """The dequantized demo with every 2-D Linear weight (not embedding, head, norms, router) in compressed-tensors
    pack-quantized 4 bits (round to nearest, symmetric, bf16 scales)."""
    from quant_packers import SKIP_ALWAYS, pack_module, quant_config, quantize
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        with safe_open(str(src / shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if k.endswith(".weight") and t.dim() == 2 and not any(x in k for x in SKIP_ALWAYS):
                    u, s, z = quantize(t, group, False, torch.bfloat16)
                    for suffix, packed in pack_module("compressed-tensors", u, s, z, False).items():
                        out[f"{k.removesuffix('.weight')}.{suffix}"] = packed
                else:
                    out[k] = t
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quant_config("compressed-tensors", group, False, [])
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _prompts(n: int, length: int, vocab: int = 120000) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _timed(fn, repeats: int = 5) -> float:
    """Median seconds of `repeats` calls after one warm-up (the median: the machine is shared and noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return _median(times)


def run_ours(path: Path, dtype: str, prompt_len: int, decode_tokens: int) -> dict:
    from deepseek_mcp.inference.engine.batch import ScheduledSeq
    from deepseek_mcp.inference.engine.core import EngineCore
    from deepseek_mcp.inference.engine.engine import Engine
    from deepseek_mcp.inference.engine.runner import cache_bytes_per_token
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.inference.engine.sequence import Sequence

    eng = Engine.from_pretrained(path, device="cpu", dtype=dtype, kernels="torch", dequantize_fp8="auto")
    (prompt,) = _prompts(1, prompt_len)
    bs = 16
    runner = eng.make_runner(-(-prompt_len // bs), bs)
    table = list(range(runner.num_blocks))
    prefill_s = _timed(lambda: runner.run([ScheduledSeq(prompt, 0, table)]))
    res = {"prefill_tok_s": prompt_len / prefill_s}
    for batch in (1, 8):
        # the server's step (EngineCore: scheduler, paged cache, sampling, stop checks), each decode step timed
        steps: list[float] = []
        for rep in range(4):
            core = EngineCore(eng, max_num_seqs=batch, max_num_batched_tokens=16 * batch,
                              cache_tokens=batch * (16 + decode_tokens + bs), block_size=bs)
            params = SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True)
            for i, p in enumerate(_prompts(batch, 16)):
                core.scheduler.add(Sequence(str(i), p, params))
            core.step()  # prefill, samples the first token
            while core.scheduler.has_work():
                t = time.perf_counter()
                core.step()
                if rep:  # the first pass warms up
                    steps.append(time.perf_counter() - t)
        res[f"decode_b{batch}_tok_s"] = batch / _median(steps)
    res["cache_bytes_per_token"] = cache_bytes_per_token(eng.config, eng.dtype)
    return res


def hf_decode_step_times(model, batch: int, decode_tokens: int) -> list[float]:
    """Seconds of each greedy decode step of transformers' model over `batch` 16-token prompts, called step by step
    with its KV cache (what generate() runs, minus its bookkeeping). The cache argument is `cache` in
    transformers 5.2x and `past_key_values` before (deprecated in 5.2x, removed in 5.40)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    steps = []
    with torch.inference_mode():
        out = model(torch.tensor(_prompts(batch, 16)), use_cache=True, logits_to_keep=1)
        past, nxt = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(decode_tokens):
            t = time.perf_counter()  # the forward and the greedy pick (ours: EngineCore.step, sampling included)
            out = model(nxt, use_cache=True, **{name: past})
            past, nxt = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
    return steps


def run_hf(path: Path, dtype: str, prompt_len: int, decode_tokens: int) -> dict:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    (prompt,) = _prompts(1, prompt_len)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        prefill_s = _timed(lambda: model(ids, logits_to_keep=1))
    res = {"prefill_tok_s": prompt_len / prefill_s}
    for batch in (1, 8):
        steps: list[float] = []
        for rep in range(4):
            times = hf_decode_step_times(model, batch, decode_tokens)
            if rep:  # the first pass warms up
                steps += times
        res[f"decode_b{batch}_tok_s"] = batch / _median(steps)
    cfg = model.config
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    res["cache_bytes_per_token"] = (cfg.num_hidden_layers * cfg.num_attention_heads
                                    * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * elem)
    return res


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    fn = run_ours if args.impl == "ours" else run_hf
    res = fn(Path(args.path), args.dtype, args.prompt_len, args.decode_tokens)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def spawn(impl: str, path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--path", str(path), "--dtype", args.dtype,
           "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{impl} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decode_step_times(eng, batch: int, decode_tokens: int) -> list[float]:
    """Seconds of each decode step (`EngineCore.step`) of `batch` 16-token prompts, after their prefill step."""
    from deepseek_mcp.inference.engine.core import EngineCore
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.inference.engine.sequence import Sequence

    core = EngineCore(eng, max_num_seqs=batch, max_num_batched_tokens=16 * batch,
                      cache_tokens=batch * (32 + decode_tokens), block_size=16)
    for i, p in enumerate(_prompts(batch, 16)):
        core.scheduler.add(Sequence(str(i), p, SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True)))
    core.step()
    steps = []
    while core.scheduler.has_work():
        t = time.perf_counter()
        core.step()
        steps.append(time.perf_counter() - t)
    return steps


def interleaved(path: Path, dtype: str, decode_tokens: int, rounds: int) -> None:
    """Both implementations in one process on the same weights, their decode passes alternated, so a noisy
    neighbour slows both alike: per round and batch, the ratio of median step times."""
    from transformers import DeepseekV3ForCausalLM

    from deepseek_mcp.inference.engine.engine import Engine

    eng = Engine.from_pretrained(path, device="cpu", dtype=dtype, kernels="torch")
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def ours(batch: int) -> list[float]:
        return decode_step_times(eng, batch, decode_tokens)

    def theirs(batch: int) -> list[float]:
        return hf_decode_step_times(hf, batch, decode_tokens)

    print(f"# interleaved decode, {dtype} copy of the demo, {cpu_name()}, {torch.get_num_threads()} thread(s): "
          "median ms per step, each round ours then transformers")
    print("| batch | round | ours ms | transformers ms | ours speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        ours(batch), theirs(batch)  # warm-up
        for r in range(rounds):
            a, b = _median(ours(batch)) * 1e3, _median(theirs(batch)) * 1e3
            print(f"| {batch} | {r + 1} | {a:.2f} | {b:.2f} | {b / a:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--skip-hf", action="store_true", help="leave transformers out (no ratios)")
    ap.add_argument("--interleaved", type=int, metavar="ROUNDS", default=0,
                    help="instead: both implementations in one process, decode passes alternated, ROUNDS rounds")
    args = ap.parse_args()
    args.impl = args.child
    if args.child:
        child(args)
        return

    from deepseek_mcp.inference.model.demo import demo_checkpoint_path
    from deepseek_mcp.inference.resources import default_cache_dir

    demo = demo_checkpoint_path()
    deq = dequantized_copy(demo, default_cache_dir() / f"demo-dequantized-{args.dtype}", getattr(torch, args.dtype))
    if args.interleaved:
        torch.set_num_threads(args.threads)
        interleaved(deq, args.dtype, args.decode_tokens, args.interleaved)
        return
    q4 = int4_copy(deq, default_cache_dir() / f"demo-int4-ct-g128-{args.dtype}")
    rows = {"ours (FP8 demo)": spawn("ours", demo, args), f"ours ({args.dtype} copy)": spawn("ours", deq, args),
            "ours (4-bit copy)": spawn("ours", q4, args)}
    if not args.skip_hf:
        rows[f"transformers ({args.dtype} copy)"] = spawn("hf", deq, args)
    hf = rows.get(f"transformers ({args.dtype} copy)")
    print(f"# engine benchmark: demo checkpoint, {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"dtype {args.dtype}, prompt {args.prompt_len} tokens, {args.decode_tokens} decode tokens")
    cols = ["prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_mb", "cache_bytes_per_token"]
    print("| implementation | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows.items():
        cells = []
        for c in cols:
            ratio = f" ({r[c] / hf[c]:.2f}x)" if hf and not name.startswith("transformers") else ""
            cells.append(f"{r[c]:.1f}{ratio}" if isinstance(r[c], float) else f"{r[c]}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
