"""Host work per decode step, with a model that does no compute.

    python bench/host.py [--steps 20] [--batches 1,64,256] [--contexts 1024,32768,131072]

Drives the real `EngineCore` step (scheduler, block manager, the runner's step inputs with its persistent block
table, sampling, stop checks) over B sequences already holding C tokens of context; the runner's model is
replaced by one returning zero logits, so what is timed is the host work of a step. Target: under 1 ms per step
at batch 64, flat in context. Prints one markdown table (ms per step: total, schedule, inputs, sample+postprocess;
with --tensor-parallel also rank 0's step encoding and one worker's decoding + inputs, not counted in the total).
"""

from __future__ import annotations

import argparse
import gc
import time
from types import SimpleNamespace

import torch

from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.sequence import Sequence, SequenceStatus
from deepseek_mcp.inference.engine.step_codec import StepDecoder, StepEncoder
from deepseek_mcp.inference.engine.step_inputs import StepInputs

VOCAB = 1024


class NullRunner:
    """ModelRunner.run without the model: the step's inputs are built and staged as for a real forward. With
    `tp` it also does the host work tensor parallelism adds (without the broadcast): rank 0 encodes the step's
    payload ("deltas": `StepEncoder` as the engine runs it; "full": a fresh encoder every step, so the whole
    block tables, as before the deltas) and one worker decodes it and builds its own step inputs."""

    def __init__(self, num_blocks: int, block_size: int, tp: str | None = None):
        self.num_blocks, self.block_size, self.tp = num_blocks, block_size, tp
        self.inputs = StepInputs(num_blocks, block_size, torch.device("cpu"))
        self.build_s = self.encode_s = self.worker_s = 0.0
        self.payload = 0  # int64 values sent, summed over steps
        if tp is not None:
            self.encoder, self.decoder = StepEncoder(num_blocks, block_size), StepDecoder()
            self.worker_inputs = StepInputs(num_blocks, block_size, torch.device("cpu"))

    def run(self, seqs, all_logits: bool = False) -> torch.Tensor:
        if self.tp is not None:
            t = time.perf_counter()
            if self.tp == "full":
                self.encoder, self.decoder = StepEncoder(self.num_blocks, self.block_size), StepDecoder()
            payload = self.encoder.encode(seqs)
            t1 = time.perf_counter()
            self.worker_inputs.build(self.decoder.decode(payload, len(seqs)), all_logits)
            self.encode_s += t1 - t
            self.worker_s += time.perf_counter() - t1
            self.payload += payload.numel()
        t = time.perf_counter()
        _, _, meta = self.inputs.build(seqs, all_logits)
        self.build_s += time.perf_counter() - t
        return torch.zeros(meta.logits_indices.shape[0], VOCAB)


def fast_forward(core: EngineCore, batch: int, context: int, steps: int) -> None:
    """Put `batch` sequences into the running set as if their `context`-token prompts were prefilled."""
    sched, bm = core.scheduler, core.block_manager
    bs = bm.block_size
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        seq = Sequence(str(i), [5] * context, params)
        seq.cap_length(sched.max_model_len)
        seq.block_table = bm.allocate(-(-context // bs))
        seq.block_hashes = [i.to_bytes(4, "little") + j.to_bytes(4, "little") for j in range(context // bs)]
        seq.num_computed_tokens = context - 1  # the last prompt token is computed by the first timed step
        seq.num_registered_blocks = context // bs
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
        sched._by_id[seq.request_id] = seq


def measure(batch: int, context: int, steps: int, block_size: int, no_gc: bool = False,
            tp: str | None = None) -> dict[str, float]:
    num_blocks = batch * (-(-(context + steps + 8) // block_size)) + 8
    runner = NullRunner(num_blocks, block_size, tp)
    engine = SimpleNamespace(max_context=context + steps + 16)
    core = EngineCore(engine, max_num_seqs=batch, max_num_batched_tokens=max(batch, 512), runner=runner)
    fast_forward(core, batch, context, steps)
    for _ in range(3):  # warm-up: first sight of every block table
        core.step()
    runner.build_s = runner.encode_s = runner.worker_s = 0.0
    runner.payload = 0
    sched_s = 0.0
    schedule = core.scheduler.schedule

    def timed_schedule():
        nonlocal sched_s
        t = time.perf_counter()
        out = schedule()
        sched_s += time.perf_counter() - t
        return out

    core.scheduler.schedule = timed_schedule
    if no_gc:
        gc.disable()
    t0 = time.perf_counter()
    for _ in range(steps):
        res = core.step()
        if res.error is not None:
            raise res.error
        assert len(res.updates) == batch
    total = (time.perf_counter() - t0) / steps * 1e3
    gc.enable()
    tp_s = runner.encode_s + runner.worker_s
    return {"total": total - tp_s / steps * 1e3, "schedule": sched_s / steps * 1e3,
            "inputs": runner.build_s / steps * 1e3, "rest": total - (sched_s + runner.build_s + tp_s) / steps * 1e3,
            "encode": runner.encode_s / steps * 1e3, "worker": runner.worker_s / steps * 1e3,
            "payload": runner.payload / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--contexts", default="1024,32768,131072")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tensor-parallel", choices=["deltas", "full"], help="also time the host work tensor "
                    "parallelism adds: rank 0's step encoding and one worker's decoding + step inputs; 'full' sends "
                    "the whole block tables every step (the behavior before the deltas)")
    ap.add_argument("--no-gc", action="store_true", help="Python's cyclic GC off while timing (it walks every "
                    "token list, so with it on a step's cost grows with the contexts held)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# host ms per decode step (null model, vocab {VOCAB}), block size {args.block_size}, "
          f"{args.steps} steps, torch {torch.__version__}, {args.threads} thread(s), "
          f"cyclic GC {'off' if args.no_gc else 'on'}")
    tp = args.tensor_parallel
    extra = f" tp encode ({tp}) | tp worker | payload int64/step |" if tp else ""
    print("| batch | context | ms/step | schedule | inputs | sample+postprocess |" + extra)
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if tp else ""))
    for b in (int(x) for x in args.batches.split(",")):
        for c in (int(x) for x in args.contexts.split(",")):
            r = measure(b, c, args.steps, args.block_size, args.no_gc, tp)
            gc.collect()
            cells = f" {r['encode']:.3f} | {r['worker']:.3f} | {r['payload']:.0f} |" if tp else ""
            print(f"| {b} | {c} | {r['total']:.3f} | {r['schedule']:.3f} | {r['inputs']:.3f} | {r['rest']:.3f} |"
                  + cells, flush=True)


if __name__ == "__main__":
    main()
