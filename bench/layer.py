"""One DeepSeek-V3.1-shaped MoE decoder layer at real size, random FP8 weights: µs per layer on a GPU.

    python bench/layer.py [--batches 1,8,64] [--contexts 4096,32768] [--out DIR]

Hidden 7168, 128 heads, q_lora 1536, kv_lora 512 + rope 64, 256 routed experts (top 8 of 8 groups, 4 kept)
of width 2048 + 1 shared, FP8 e4m3 weights with UE8M0 128x128 scales, bf16 activations, the Triton path.
For each batch B and context C: the decode step of one layer (eager, then replayed from a CUDA graph), the
bytes it must touch (every attention / shared / router weight, the routed experts the batch selects, the latent
cache B x C x 576 x 2 bytes), the HBM floor (bytes / peak bandwidth), the fraction of it reached, and x61 as a
per-token estimate of the 61-layer model (the 3 dense layers counted as MoE ones). Without CUDA it prints the
byte model and says that timings need a GPU. Imports torch and triton only (through the engine's model code).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

V31 = dict(vocab_size=1024, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
           num_hidden_layers=1, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
           n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
           qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8,
           topk_group=4, num_experts_per_tok=8, first_k_dense_replace=0, norm_topk_prob=True,
           max_position_embeddings=163840, rms_norm_eps=1e-6, model_type="deepseek_v3",
           rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
           quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                "activation_scheme": "dynamic", "scale_fmt": "ue8m0"})
PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "H20": 4.0e12}  # bytes/s, SXM parts


def build_layer(device: torch.device):
    from deepseek_mcp.inference.model.config import ModelConfig
    from deepseek_mcp.inference.model.transformer import Runtime, Transformer

    cfg = ModelConfig.from_dict(V31, "bench/layer.py")
    rt = Runtime(dtype=torch.bfloat16, kernels="triton", scale_fmt="ue8m0")
    model = Transformer(cfg, rt, fp8=True, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                p.copy_((torch.randn(p.shape, device=device, generator=g) * 64).clamp(-448, 448).to(p.dtype))
            elif name.endswith("weight_scale_inv"):
                p.copy_(2.0 ** torch.randint(-14, -9, p.shape, device=device, generator=g).float())
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, device=device, generator=g) * 0.02)
    model.prepare_for_kernels_()
    return cfg, model


def bytes_touched(cfg, batch: int, context: int) -> int:
    """Weights one decode step of the layer must read plus its latent cache."""
    d, h = cfg.hidden_size, cfg.num_heads
    attn = d * (cfg.q_lora_rank + cfg.kv_cache_dim) + cfg.q_lora_rank * h * cfg.qk_head_dim  # FP8: 1 B each
    attn += h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * 2  # W_UK / W_UV in bf16
    attn += h * cfg.v_head_dim * d
    expert = 3 * d * cfg.moe_intermediate_size
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** batch)  # expected experts a batch of random tokens selects
    moe = (distinct + cfg.n_shared_experts) * expert + e * d * 4  # + the fp32 router weight
    cache = batch * context * cfg.kv_cache_dim * 2
    return int(attn + moe + cache)


def time_layer(model, cfg, batch: int, context: int, device: torch.device, graphs: bool) -> float:
    from deepseek_mcp.inference.engine.batch import ScheduledSeq
    from deepseek_mcp.inference.engine.step_inputs import StepInputs

    bs = 64
    per_seq = -(-(context + 1) // bs)
    cache = torch.zeros(per_seq * batch, bs, cfg.kv_cache_dim, dtype=torch.bfloat16, device=device)
    inputs = StepInputs(per_seq * batch, bs, device)
    seqs = [ScheduledSeq([1], context, list(range(b * per_seq, (b + 1) * per_seq))) for b in range(batch)]
    _, positions, meta = inputs.build(seqs)
    cos, sin = model.rotary.cos_sin(positions)
    layer = model.model.layers[0]
    x = torch.randn(batch, cfg.hidden_size, dtype=torch.bfloat16, device=device)

    def step():
        return layer(x, None, cos, sin, model.rotary, meta, cache)

    with torch.inference_mode():
        for _ in range(3):
            step()  # compiles and autotunes
        run = step
        if graphs:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 20
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            run()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3  # µs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to DIR/layer.md")
    args = ap.parse_args()
    from deepseek_mcp.inference.model.config import ModelConfig

    cfg = ModelConfig.from_dict(V31, "bench/layer.py")
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "no GPU"
    bw = next((v for k, v in PEAK_BW.items() if k in name), 3.35e12)
    lines = [f"# one V3.1 MoE decoder layer, decode step, random FP8 weights; device: {name}, "
             f"peak HBM {bw / 1e12:.2f} TB/s assumed; torch {torch.__version__}",
             "| batch | context | mode | µs/layer | MB touched | HBM floor µs | of floor | x61 ms/token |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    model = None
    if cuda:
        _, model = build_layer(torch.device("cuda"))
    for b in (int(v) for v in args.batches.split(",")):
        for c in (int(v) for v in args.contexts.split(",")):
            nbytes = bytes_touched(cfg, b, c)
            floor = nbytes / bw * 1e6
            for mode in ("eager", "cuda graph"):
                if model is None:
                    lines.append(f"| {b} | {c} | {mode} | needs a GPU | {nbytes / 1e6:.1f} | {floor:.1f} | | |")
                    continue
                us = time_layer(model, cfg, b, c, torch.device("cuda"), mode == "cuda graph")
                lines.append(f"| {b} | {c} | {mode} | {us:.1f} | {nbytes / 1e6:.1f} | {floor:.1f} | "
                             f"{floor / us:.0%} | {us * 61 / 1e3:.2f} |")
    if not cuda:
        lines.append("\nNo CUDA device: the byte model above is computed; timings need a GPU (H100/H200).")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "layer.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
