"""Synchronous engine: load a checkpoint, compute logits, generate batches. `generate` drives the same step as
the async server (`EngineCore`), to completion."""

from __future__ import annotations

import atexit
import logging
import os
from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.runner import ModelRunner
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.sequence import Sequence
from deepseek_mcp.inference.engine.speculative import Drafter
from deepseek_mcp.inference.model.checkpoint import (
    checkpoint_is_fp8,
    find_checkpoint_files,
    load_weights,
    resolve_model_path,
)
from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.demo import DEMO_NAME, demo_checkpoint_path
from deepseek_mcp.inference.model.transformer import Runtime, Transformer
from deepseek_mcp.inference.resources import available_memory, default_cache_dir
from deepseek_mcp.inference.text.tokenizer import Tokenizer
from deepseek_mcp.kernels.platform import select_kernels, use_user_cache

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None, default: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or default).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return _DTYPES[name]


def resolve_device(device: torch.device | str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device 'cpu' or 'auto'")
    return dev


def _resolve(path_or_repo_id: str | os.PathLike | None, device: torch.device | str, dtype: torch.dtype | str | None,
             kernels: str, dequantize_fp8: bool | str):
    """Checkpoint path, config, files, device, dtype, FP8 or not, which kernels run, whether to dequantize FP8."""
    path = demo_checkpoint_path() if path_or_repo_id is None else resolve_model_path(path_or_repo_id)
    config = ModelConfig.from_file(path)
    files = find_checkpoint_files(path)
    dev = resolve_device(device)
    dt = parse_dtype(dtype, config.torch_dtype)
    fp8 = checkpoint_is_fp8(files, config)
    kernels = select_kernels(dev, kernels)  # fails at load where a forced 'triton' cannot run
    if kernels == "triton" and dev.type == "cuda":  # before the first compile (every rank resolves here)
        use_user_cache(default_cache_dir())
    if fp8 and kernels == "triton" and dev.type == "cuda":  # the CPU interpreter emulates FP8
        from deepseek_mcp.kernels.platform import fp8_supported, fp8_unsupported_notice

        if not fp8_supported(dev):  # the W8A16 kernels run (Runtime.fp8_gemm False)
            log.warning(fp8_unsupported_notice(dev))
    return path, config, files, dev, dt, fp8, kernels, dequantize_fp8


def dense_fp8_fits(model: Transformer, dtype: torch.dtype, device: torch.device, fraction: float = 0.5) -> bool:
    """True when dequantizing every FP8 weight to `dtype` adds at most `fraction` of the free memory."""
    elem = torch.empty((), dtype=dtype).element_size()
    extra = sum(p.numel() * (elem - 1) for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    return extra <= fraction * available_memory(device)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


class Engine:
    def __init__(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer, device: torch.device,
                 dtype: torch.dtype, name: str, path: Path, kernels: str, fp8: bool, ranks: Any = None,
                 speculative_tokens: int = 0):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.speculative_tokens = speculative_tokens  # MTP drafts per decode step (0: off); needs model.mtp
        self.device, self.dtype = device, dtype
        self.name, self.path, self.kernels, self.fp8 = name, path, kernels, fp8
        self.ranks = ranks  # tensor parallel: (launch.Group, distributed.ControlPlane); None on one device
        if ranks is not None:
            atexit.register(self.close)

    @property
    def tensor_parallel_size(self) -> int:
        return 1 if self.ranks is None else self.ranks[0].tp.world_size

    @property
    def failure(self) -> str | None:
        """Why a tensor-parallel engine cannot serve any more (a rank died or hung), else None."""
        return None if self.ranks is None else self.ranks[1].failure

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one device). Idempotent."""
        if self.ranks is not None:
            from deepseek_mcp.inference.engine.launch import shutdown

            group, plane = self.ranks
            self.ranks = None
            atexit.unregister(self.close)
            shutdown(group, plane)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike | None = None, device: torch.device | str = "auto",
                        dtype: torch.dtype | str | None = None, *, kernels: str = "auto",
                        dequantize_fp8: bool | str = False, progress: bool | None = None, tensor_parallel_size: int = 1,
                        dist_timeout_s: float | None = None, cpu_prepack: bool = True,
                        speculative_tokens: int = 0) -> Engine:
        """Load a DeepseekV3ForCausalLM checkpoint (None: the demo checkpoint, written on first use).

        dequantize_fp8: True replaces FP8 weights by dense ones at load, False keeps them FP8 (the CPU torch
        path then dequantizes each block on use), "auto" dequantizes on the torch path when the dense copy fits
        (`dense_fp8_fits`; under tensor parallelism "auto" keeps FP8); on a GPU without FP8 support it is always
        done.

        `tensor_parallel_size` N > 1 starts N-1 worker processes on this machine (cuda:1..N-1 with NCCL, or CPU
        processes with gloo) and serves from this one, rank 0 (under torchrun: joins the ranks it started);
        `dist_timeout_s` bounds every collective. Use the engine as a context manager, or `close()` it.

        `cpu_prepack` False keeps the CPU's bf16 weights as loaded (`F.linear` every call) instead of reordered
        once into oneDNN's layout (`Transformer.prepare_for_kernels_`): for comparisons.

        `speculative_tokens` K in 1..3 also loads the checkpoint's multi-token-prediction layer (its weights and
        one more layer of latent cache) and drafts K tokens per decode step with it (mtp_drafter.py); the tokens
        are the same as without. 0 (default): the layer is not loaded."""
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
        from deepseek_mcp.inference.engine.mtp_drafter import MAX_SPECULATIVE_TOKENS

        if not 0 <= speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be 0 (off) to {MAX_SPECULATIVE_TOKENS}, "
                             f"got {speculative_tokens}")
        path, config, files, dev, dt, fp8, kernels, dequantize_fp8 = _resolve(
            path_or_repo_id, device, dtype, kernels, dequantize_fp8)
        from deepseek_mcp.kernels.platform import fp8_gemm_runs

        rt = Runtime(dtype=dt, kernels=kernels,
                     scale_fmt=config.quant.scale_fmt if config.quant else None,
                     fp8_block=config.quant.block_size[0] if config.quant else 128,
                     fp8_gemm=fp8_gemm_runs(dev, kernels))
        tokenizer = Tokenizer.load(path if (path / "tokenizer.json").is_file() else None)
        name = DEMO_NAME if path_or_repo_id is None else str(path_or_repo_id)
        from deepseek_mcp.inference.engine.launch import DEFAULT_TIMEOUT_S, RankSpec, start_ranks, under_torchrun

        if tensor_parallel_size == 1 and under_torchrun():  # torchrun's world size is the tensor-parallel size
            tensor_parallel_size = int(os.environ["WORLD_SIZE"])
        if tensor_parallel_size > 1:
            dequantize_fp8 = dequantize_fp8 is True
            spec = RankSpec(str(path), str(dt).removeprefix("torch."), kernels, dev.type,
                            bool(fp8 and dequantize_fp8), dist_timeout_s or DEFAULT_TIMEOUT_S,
                            mtp=speculative_tokens > 0)
            model, group, plane = start_ranks(spec, tensor_parallel_size)
            return cls(model, config, tokenizer, group.device, dt, name, path, kernels,
                       fp8 and not dequantize_fp8, ranks=(group, plane), speculative_tokens=speculative_tokens)
        model = Transformer(config, rt, fp8=fp8, device=dev, mtp=speculative_tokens > 0)
        load_weights(model, files, progress=progress)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if fp8 and dequantize_fp8 == "auto":
            dequantize_fp8 = kernels == "torch" and dense_fp8_fits(model, dt, dev)
        if fp8 and dequantize_fp8:
            model.dequantize_fp8_()
            fp8 = False
        model.prepare_for_kernels_(cpu_prepack=cpu_prepack)
        model.eval()
        return cls(model, config, tokenizer, dev, dt, name, path, kernels, fp8,
                   speculative_tokens=speculative_tokens)

    @staticmethod
    def run_rank(path_or_repo_id: str | os.PathLike | None = None, device: torch.device | str = "auto",
                 dtype: torch.dtype | str | None = None, *, kernels: str = "auto", dequantize_fp8: bool = False,
                 dist_timeout_s: float | None = None, speculative_tokens: int = 0) -> int:
        """A rank > 0 that torchrun started: load this rank's slices and run rank 0's steps until it stops."""
        from deepseek_mcp.inference.engine.launch import DEFAULT_TIMEOUT_S, RankSpec, run_worker

        path, _, _, dev, dt, fp8, kernels, dequantize_fp8 = _resolve(
            path_or_repo_id, device, dtype, kernels, dequantize_fp8)
        return run_worker(RankSpec(str(path), str(dt).removeprefix("torch."), kernels, dev.type,
                                   bool(fp8 and dequantize_fp8), dist_timeout_s or DEFAULT_TIMEOUT_S,
                                   mtp=speculative_tokens > 0))

    @property
    def num_parameters(self) -> int:
        """Of the whole model as the checkpoint holds it: counted on a meta-device copy, so neither the layout for
        the step (fused and split weights) nor a tensor-parallel split changes it."""
        meta = Transformer(self.config, Runtime(dtype=self.dtype), fp8=self.fp8, device="meta")
        return sum(p.numel() * (8 if p.dtype == torch.int32 else 1) for p in meta.parameters())  # 8 4-bit codes

    @property
    def parallel_description(self) -> str | None:
        if self.ranks is None:
            return None
        n = self.tensor_parallel_size
        return (f"tensor parallel over {n} ranks (heads, MLPs, vocabulary split; every expert split along its "
                f"intermediate size, {self.config.moe_intermediate_size // n} per rank; latent KV cache replicated "
                "on every rank)")

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight as laid out for the step (after fusions, W_UK / W_UV, dequantization)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def is_demo(self) -> bool:
        return self.name == DEMO_NAME

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def make_runner(self, num_blocks: int, block_size: int = 16, setting: str = "cache_tokens") -> Any:
        runner = ModelRunner(self.model, self.config, num_blocks, block_size, self.device, self.dtype, setting)
        if self.ranks is None:
            return runner
        from deepseek_mcp.inference.engine.distributed import DistributedRunner

        return DistributedRunner(runner, self.ranks[1])

    def check_prompt(self, token_ids: abc.Sequence[int], max_tokens: int = 0) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: pass at least one token")
        v = self.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < v), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{v - 1})")
        if len(token_ids) + max_tokens > self.max_context:
            raise ValueError(f"prompt of {len(token_ids)} tokens plus max_tokens {max_tokens} exceeds the model's "
                             f"context of {self.max_context} tokens; shorten the prompt or lower max_tokens")

    def logits(self, token_ids: abc.Sequence[int], block_size: int = 16) -> torch.Tensor:
        """Prefill logits of every position: [len(token_ids), V] float32."""
        token_ids = list(token_ids)
        self.check_prompt(token_ids)
        n_blocks = -(-len(token_ids) // block_size)
        runner = self.make_runner(n_blocks, block_size)
        return runner.run([ScheduledSeq(token_ids, 0, list(range(n_blocks)))], all_logits=True)

    def generate(self, prompts: abc.Sequence[abc.Sequence[int]], params: SamplingParams | abc.Sequence[SamplingParams],
                 block_size: int = 16, *, drafter: Drafter | None = None, speculative_tokens: int | None = None
                 ) -> list[GenerationOutput]:
        """Batched generation through the server's step (`EngineCore`: scheduler, paged cache, processors,
        sampling): a cache sized for every prompt plus its max_tokens, so all are admitted at once, prefill
        in one step and decode one token per step (1 + accepted drafts with a `drafter`, or the MTP layer's
        with `speculative_tokens`, by default the engine's), never preempted."""
        prompts = [list(p) for p in prompts]
        plist = list(params) if isinstance(params, abc.Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        if not prompts:
            return []
        for p, sp in zip(prompts, plist):
            self.check_prompt(p, sp.max_tokens)
        num_blocks = sum(-(-(len(p) + sp.max_tokens) // block_size) for p, sp in zip(prompts, plist))
        k = self.speculative_tokens if speculative_tokens is None else speculative_tokens
        budget = max(sum(map(len, prompts)), len(prompts) * (1 + k))  # the prefill, or a decode and its drafts
        core = EngineCore(self, max_num_seqs=len(prompts), max_num_batched_tokens=budget,
                          cache_tokens=num_blocks * block_size, block_size=block_size,
                          warm_up=False,  # a pool per call: compiled on first use, eager
                          drafter=drafter, speculative_tokens=speculative_tokens)
        seqs = [Sequence(str(i), p, sp, decoder=self.tokenizer.incremental_decoder(), eos_id=self.tokenizer.eos_id)
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        for seq in seqs:
            core.scheduler.add(seq)
        try:
            while core.scheduler.has_work():
                result = core.step()
                if result.error is not None:
                    raise result.error
        finally:
            core.close()
        return [GenerationOutput(s.output_ids, s.text, s.finish_reason or "length", s.num_prompt_tokens)
                for s in seqs]
