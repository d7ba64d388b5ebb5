"""The decode step as the GPU needs it: weights laid out once at load, step inputs from a persistent block table,
no host sync but the read of the sampled tokens, the naive MLA form for prefill."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_checkpoints import fp8_checkpoint_pair, tiny_hf_model  # noqa: E402
from reference.mla import prefill_attention_absorbed  # noqa: E402
from sync_guard import HostSyncError, NoHostSync  # noqa: E402

from deepseek_mcp.inference.engine.batch import ScheduledSeq, build_batch  # noqa: E402
from deepseek_mcp.inference.engine.engine import Engine  # noqa: E402
from deepseek_mcp.inference.engine.sampling import SamplingParams, sample  # noqa: E402
from deepseek_mcp.inference.engine.step_inputs import StepInputs  # noqa: E402
from deepseek_mcp.inference.model import attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return fp8_checkpoint_pair(tmp_path_factory.mktemp("step"), top_k=2, n_group=2, topk_group=1)


def test_guard_catches_host_reads():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: x.cpu(),
                 lambda: int(x[0])):
        with pytest.raises(HostSyncError, match="host read"):
            with NoHostSync():
                read()


def test_weights_laid_out_once_at_load(tmp_path):
    path = tmp_path / "m"
    hf = tiny_hf_model(path, seed=3)
    eng = Engine.from_pretrained(path, device="cpu", dtype="float32")
    attn = eng.model.model.layers[1].self_attn
    assert attn.kv_b_proj is None and attn.q_a_proj is None and attn.kv_a_proj_with_mqa is None
    assert attn.w_uk.shape == (4, 16, 32) and attn.w_uv.shape == (4, 16, 32)  # [H, nope, C], [H, v, C]
    assert attn.qkv_a_proj.weight.shape == (48 + 32 + 8, 64)
    kv_b = hf.model.layers[1].self_attn.kv_b_proj.weight.view(4, 32, 32)
    assert torch.equal(attn.w_uk, kv_b[:, :16]) and torch.equal(attn.w_uv, kv_b[:, 16:])
    mlp = eng.model.model.layers[1].mlp
    assert mlp.shared_experts.gate_up_proj.weight.shape == (64, 64) and mlp.shared_experts.gate_proj is None
    assert mlp.gate.weight.dtype == torch.float32
    assert eng.model.model.layers[0].mlp.gate_up_proj is not None  # the dense MLP too
    biases = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))  # HF buffers
    assert sum(p.numel() for p in eng.model.parameters()) == sum(p.numel() for p in hf.parameters()) + biases
    assert eng.weight_bytes == sum(p.numel() * 4 for p in eng.model.parameters())


def test_fp8_dequantized_at_load_when_auto(ckpts):
    auto = Engine.from_pretrained(ckpts["fp8"], device="cpu", dtype="bfloat16", dequantize_fp8="auto")
    kept = Engine.from_pretrained(ckpts["fp8"], device="cpu", dtype="bfloat16")
    assert not auto.fp8 and auto.model.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    assert kept.fp8 and kept.model.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    assert auto.weight_bytes > kept.weight_bytes
    ids = list(range(3, 30))
    a, b = auto.logits(ids), kept.logits(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()  # same weights; bf16 rounding in a different order


def _seqs(lengths, tables, new):
    return [ScheduledSeq(list(range(n)), start, t) for n, start, t in zip(new, lengths, tables)]


def test_step_inputs_match_build_batch_and_write_only_new_blocks():
    bs, inputs = 4, StepInputs(128, 4, torch.device("cpu"), rows=2, cols=2)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(128, generator=g).tolist()
    sync_rows, written = inputs._sync_rows, []

    def counting(seqs):
        rows, changes = sync_rows(seqs)
        written.append(len(changes) // 3)
        return rows, changes

    inputs._sync_rows = counting
    tables = [perm[0:3], perm[10:12], perm[20:25]]  # live lists, grown in place as a scheduler does
    starts, new = [0, 0, 0], [9, 5, 17]
    for step in range(12):
        seqs = _seqs(starts, tables, new)
        order = [2, 0, 1] if step % 3 == 2 else [0, 1, 2]  # rows out of batch order: gathered
        seqs = [seqs[i] for i in order]
        ids, pos, meta = inputs.build(seqs)
        rids, rpos, ref = build_batch(seqs, bs, torch.device("cpu"))
        assert torch.equal(ids, rids) and torch.equal(pos, rpos)
        assert torch.equal(meta.slot_mapping, ref.slot_mapping)
        assert torch.equal(meta.seq_lens, ref.seq_lens.long()) and torch.equal(meta.logits_indices, ref.logits_indices)
        for b, s in enumerate(seqs):
            assert meta.block_tables[b, : len(s.block_table)].tolist() == list(s.block_table)
        assert sum(written) == sum(len(t) for t in tables)  # each entry written once, ever
        for i in range(3):
            starts[i] += new[i]
            new[i] = 1
            if starts[i] + 1 > len(tables[i]) * bs:
                tables[i].append(perm[40 + 3 * step + i])
    with pytest.raises(ValueError, match="outside the pool"):
        inputs.build([ScheduledSeq([1], 0, [128])])


def test_naive_prefill_equals_absorbed_float64():
    g = torch.Generator().manual_seed(1)
    h, nope, r, c, v, bs = 3, 8, 4, 16, 8, 4
    cache = torch.randn(12, bs, c + r, dtype=torch.float64, generator=g)
    seqs = [ScheduledSeq([0] * 5, 3, [7, 2]), ScheduledSeq([0], 9, [1, 5, 0]), ScheduledSeq([0] * 6, 0, [3, 4])]
    _, _, meta = StepInputs(12, bs, torch.device("cpu")).build(seqs)
    t = 12
    q_nope = torch.randn(t, h, nope, dtype=torch.float64, generator=g)
    q_pe = torch.randn(t, h, r, dtype=torch.float64, generator=g)
    w_uk = torch.randn(h, nope, c, dtype=torch.float64, generator=g)
    w_uv = torch.randn(h, v, c, dtype=torch.float64, generator=g)
    q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    absorbed = prefill_attention_absorbed(q_latent, q_pe, cache.float(), meta, 0.3).double()
    ref = torch.einsum("thc,hvc->thv", absorbed, w_uv)
    got = attention.prefill_attention_naive(q_nope.float(), q_pe.float(), cache.float(), meta, w_uk.float(),
                                            w_uv.float(), 0.3)
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_decode_step_has_no_host_sync(ckpts):
    """Forward (Triton path) + sampling (greedy, temperature, seeded, top-k, top-p) under the guard; the only
    read is of the sampled tokens, after it."""
    pytest.importorskip("triton")
    eng = Engine.from_pretrained(ckpts["fp8"], device=DEVICE, dtype="bfloat16", kernels="triton")
    runner = eng.make_runner(16, 4)
    prompts = [[5, 17, 99, 3, 42], [1, 2, 3], [7] * 9, [4, 4], [9, 8, 7, 6]]
    tables = [[2 * i, 2 * i + 1, 10 + i] for i in range(5)]
    runner.run([ScheduledSeq(p, 0, t) for p, t in zip(prompts, tables)])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.9)]
    step = [ScheduledSeq([11], len(p), t) for p, t in zip(prompts, tables)]
    with torch.inference_mode(), NoHostSync():
        logits = runner.run(step)
        if DEVICE == "cuda":  # the sampler's host-to-device copies must not synchronize the stream either
            torch.cuda.set_sync_debug_mode("error")
        try:
            tokens = sample(logits, params, [0, 1, 2, 3, 4], sync_free=True)
        finally:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert len(tokens.tolist()) == 5 and tokens.tolist()[0] == int(logits[0].argmax())


def test_sync_free_sampling_draws_the_same_tokens():
    """Decisions from the host params (full sort for top-p rows) give exactly the shortlist path's draws."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 3000, generator=g) * 3
    params = [SamplingParams(temperature=0.9, top_p=0.8, seed=1), SamplingParams(temperature=1.0, top_k=7, seed=2),
              SamplingParams(temperature=0.5, top_k=50, top_p=0.5, seed=3), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_p=0.95, seed=4), SamplingParams(temperature=0.7, seed=5)]
    for _ in range(5):
        a = sample(logits, params, [0] * 6, sync_free=False)
        b = sample(logits, params, [0] * 6, sync_free=True)
        assert torch.equal(a, b)
        logits = logits.roll(1, dims=1)
    top_k_only = [SamplingParams(temperature=1.0, top_k=k, seed=k) for k in (1, 5, 40)]
    a = sample(logits[:3], top_k_only, [0] * 3, sync_free=False)
    b = sample(logits[:3], top_k_only, [0] * 3, sync_free=True)
    assert torch.equal(a, b)
