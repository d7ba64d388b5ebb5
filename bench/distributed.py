"""Tensor-parallel decode on the demo checkpoint, CPU + gloo: N = 1, 2, 4 ranks on this machine.

    python bench/distributed.py [--sizes 1 2 4] [--batch 1 8] [--steps 16] [--runs 3] [--dtype bfloat16]
    python bench/distributed.py --model-v31 ../shared/fixtures/deepseek_v31_config.json   # + the written model

Per size and batch: decode step time (median of `--steps` steps, per run; `--runs` runs after a warm-up, spread
min..max), all-reduce bytes per token per layer and per step (counted on rank 0 around torch.distributed), the
logits gather, and the control-plane broadcast per step (bytes and time, measured around its send). With
`--model-v31` it adds a model (not a measurement) of the V3.1 decode step on 8xH200 from the planner's per-rank
bytes and the communication volume per token and layer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


class Counter:
    """Counts the bytes of rank 0's all-reduces and gathers by wrapping torch.distributed's functions."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.all_reduce, self.gather = dist, dist.all_reduce, dist.gather
        self.reduce_bytes = self.reduce_calls = self.gather_bytes = 0

        def all_reduce(t, *a, **kw):
            self.reduce_bytes += t.numel() * t.element_size()
            self.reduce_calls += 1
            return self.all_reduce(t, *a, **kw)

        def gather(t, *a, **kw):
            self.gather_bytes += t.numel() * t.element_size()
            return self.gather(t, *a, **kw)

        dist.all_reduce, dist.gather = all_reduce, gather

    def reset(self) -> None:
        self.reduce_bytes = self.reduce_calls = self.gather_bytes = 0

    def restore(self) -> None:
        self.dist.all_reduce, self.dist.gather = self.all_reduce, self.gather


def measure(n: int, batch: int, steps: int, runs: int, dtype: str) -> dict:
    from deepseek_mcp.inference.engine.batch import ScheduledSeq
    from deepseek_mcp.inference.engine.engine import Engine

    counter = Counter()
    engine = Engine.from_pretrained(None, device="cpu", dtype=dtype, tensor_parallel_size=n, dist_timeout_s=120)
    try:
        block, prompt_len = 16, 32
        per_seq = -(-(prompt_len + steps * (runs + 1)) // block)
        runner = engine.make_runner(per_seq * batch, block)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, engine.config.vocab_size, (prompt_len,), generator=g).tolist()
                   for _ in range(batch)]
        logits = runner.run([ScheduledSeq(p, 0, t) for p, t in zip(prompts, tables)])
        tokens = logits.argmax(-1).tolist()
        pos = prompt_len
        send_s, plane = [0.0], engine.ranks[1] if engine.ranks else None
        if plane is not None:
            raw_send = plane._send

            def timed_send(*a, **kw):
                t0 = time.perf_counter()
                raw_send(*a, **kw)
                send_s[0] += time.perf_counter() - t0

            plane._send = timed_send
        per_run: list[float] = []
        for run in range(runs + 1):  # the first run warms up
            counter.reset()
            sent0, send_s[0] = plane.bytes_broadcast if plane else 0, 0.0
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                logits = runner.run([ScheduledSeq([tok], pos, t) for tok, t in zip(tokens, tables)])
                tokens = logits.argmax(-1).tolist()
                times.append(time.perf_counter() - t0)
                pos += 1
            if run:
                per_run.append(statistics.median(times) * 1e3)
        sent = (plane.bytes_broadcast - sent0) / steps if plane else 0
        layers = engine.config.num_layers
        emb = engine.config.hidden_size * torch.empty((), dtype=engine.dtype).element_size()  # one per token/step
        reduce_tok = counter.reduce_bytes / steps / batch
        return {"n": n, "batch": batch, "step_ms": statistics.median(per_run), "min_ms": min(per_run),
                "max_ms": max(per_run), "runs": runs,
                "allreduce_calls_step": counter.reduce_calls / steps,
                "allreduce_b_tok_layer": (reduce_tok - emb) / layers if n > 1 else 0.0,
                "allreduce_b_tok_step": reduce_tok, "gather_b_step": counter.gather_bytes / steps,
                "bcast_b_step": sent, "bcast_ms_step": send_s[0] / steps * 1e3}
    finally:
        engine.close()
        counter.restore()


def v31_model(config: Path, allreduce_b_tok_layer_per_hidden: float) -> str:
    """The V3.1 decode step on 8xH200 as a model: weights and latent cache read per rank at HBM speed, the
    all-reduces at NVLink bandwidth plus a fixed latency each. Not a measurement."""
    from deepseek_mcp.inference.model.config import ModelConfig
    from deepseek_mcp.inference.model.plan import weight_bytes

    cfg = ModelConfig.from_file(config)
    n, hbm, link, lat = 8, 4.8e12, 900e9 / 2, 15e-6  # unidirectional NVLink; ~15 us per small NCCL all-reduce
    w = weight_bytes(cfg, n, fp8=True)
    per_expert = w["routed_experts"] / (cfg.num_layers - cfg.first_k_dense_replace) / (cfg.n_routed_experts // n)
    moe_layers = cfg.num_layers - cfg.first_k_dense_replace
    rows = []
    for batch, ctx in ((1, 4096), (64, 4096)):
        pairs = batch * cfg.num_experts_per_tok
        hit = cfg.n_routed_experts * (1 - (1 - 1 / cfg.n_routed_experts) ** pairs)  # distinct experts touched
        experts_rank = max(hit / n, 1.0) * (1.5 if batch == 1 else 1.1)  # the busiest rank (imbalance factor)
        fixed = sum(w[k] for k in ("attention", "dense_mlp", "shared_experts", "norms_and_router"))
        fixed += w["embedding_and_head"] / 2  # lm_head is read, the embedding only for the batch's rows
        expert_b = experts_rank * per_expert * moe_layers
        cache_b = batch * ctx * cfg.kv_cache_dim * cfg.num_layers * 2  # replicated: every rank reads all of it
        mem_s = (fixed + expert_b + cache_b) / hbm
        msg = batch * allreduce_b_tok_layer_per_hidden * cfg.hidden_size / 2  # bytes per all-reduce
        comm_s = (2 * cfg.num_layers + 1) * (lat + 2 * (n - 1) / n * msg / link)
        step = mem_s + comm_s
        rows.append(f"| {batch} | {ctx} | {fixed / 1e9:.2f} | {expert_b / 1e9:.2f} ({experts_rank:.1f}/layer) | "
                    f"{cache_b / 1e9:.2f} | {mem_s * 1e3:.2f} | {msg / 1e3:.1f} KB x {2 * cfg.num_layers + 1} | "
                    f"{comm_s * 1e3:.2f} | {step * 1e3:.2f} | {batch / step:.0f} |")
    head = ("| batch | context | fixed weights GB/rank | routed experts GB/rank | latent cache GB/rank | HBM ms | "
            "all-reduce | comm ms | step ms | tok/s |\n|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    return head + "\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (rank 0 and workers)")
    ap.add_argument("--model-v31", type=Path, default=None, help="V3.1 config.json for the written model")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers' (they are started with this environment)
    torch.set_num_threads(args.threads)
    print(f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), {args.threads} torch thread(s) "
          "per rank, "
          f"torch {torch.__version__}, gloo; demo checkpoint (4 layers, hidden 256, FP8 weights), {args.dtype} "
          f"activations, torch kernels, 32-token prompts, {args.steps} decode steps x {args.runs} runs + warm-up\n")
    print("| N | batch | step ms (median) | spread min..max | all-reduces/step | all-reduce B/token/layer | "
          "gather B/step | broadcast B/step | broadcast ms/step |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    per_hidden = None
    for n in args.sizes:
        for b in args.batch:
            with ThreadPoolExecutor(1) as pool:  # torch on this VM is far slower from the main thread (see tests)
                r = pool.submit(measure, n, b, args.steps, args.runs, args.dtype).result()
            print(f"| {n} | {b} | {r['step_ms']:.2f} | {r['min_ms']:.2f}..{r['max_ms']:.2f} | "
                  f"{r['allreduce_calls_step']:.0f} | {r['allreduce_b_tok_layer']:.0f} | {r['gather_b_step']:.0f} | "
                  f"{r['bcast_b_step']:.0f} | {r['bcast_ms_step']:.3f} |", flush=True)
            if n > 1:
                per_hidden = r["allreduce_b_tok_layer"] / 256  # bytes per token, layer and hidden unit
    if args.model_v31 is not None:
        print("\nV3.1 decode step on 8xH200, a model (4.8 TB/s HBM, 450 GB/s per direction NVLink, 15 us per "
              "all-reduce), not a measurement:\n")
        print(v31_model(args.model_v31, per_hidden if per_hidden else 4.0))


if __name__ == "__main__":
    main()
