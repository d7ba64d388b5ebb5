"""Triton kernels for DeepSeek-V3 inference.

Each kernel module holds the Triton wrappers and, where the served code runs one, a pure-torch twin `*_torch` of
the same signature: the CPU path runs the model's own torch code and calls rope_kv_cache_torch, moe_route_torch and
moe_combine_torch; moe_align falls back to moe_align_torch past the kernel's size limit on the Triton path. The
other kernels' pure-torch references, which only the tests and benchmarks call, live in tests/reference/ (fp8.py,
mla.py, moe.py, norm.py, router.py, w4a16.py).

- kernels.fp8: act_quant, weight_dequant, fp8_gemm, fp8_linear
- kernels.mla: mla_decode (split-KV), mla_prefill
- kernels.moe: moe_grouped_gemm
- kernels.moe_align: moe_align (routed pairs sorted by expert: offsets, order, inv; + moe_align_torch)
- kernels.norm: rmsnorm, rmsnorm_residual (RMSNorm with the residual add fused in front; quant=True also
  writes the output as act_quant's e4m3 + scales)
- kernels.rope: rope_kv_cache (latent norm + rope of q_pe / k_pe + the paged-cache write, one launch;
  + rope_kv_cache_torch)
- kernels.router: moe_gate_route (the gate GEMM, split-K, + the router: two launches), moe_route (DeepSeek's
  group-limited top-k router), moe_combine (weighted gather-sum); + moe_route_torch, moe_combine_torch
- kernels.mla_naive: mla_prefill_naive (prefill over K / V expanded per head)
- kernels.w4a16: w4a16_gemm, w4a16_moe_gemm (4-bit weights dequantized in registers; the grouped one with all
  experts in one launch, fused SwiGLU and the token gather), w8a16_gemm, w8a16_moe_gemm (the same kernels on FP8
  e4m3 weights, for GPUs below compute capability 8.9)
- kernels.platform: select_kernels, fp8_supported, fp8_gemm_runs, fp8_unsupported_notice
- kernels.aot: compile every kernel for sm_90a (or `--arch 80`) without a GPU (registers, spills, wgmma use)

The *_triton modules hold the @triton.jit kernels and are imported only when a Triton wrapper runs, so the
twins (and the references in tests/reference/) work where Triton is not installed.
"""
