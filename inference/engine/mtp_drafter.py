"""Drafts from the model's own multi-token-prediction layer (V3's MTP; `MTPLayer` in transformer.py), run in the
engine step right after the target forward: one batched forward of the layer for every sequence of the step, then
one per further draft.

The layer at position t reads the main model's normed state at t and the token at t + 1, and writes its own latent
cache at t (the pool's last layer). So after each step:

1. **Extend** (one forward for the whole step): for every position the step made final, the layer's latent at t
   from the step's states and the now known token at t + 1: a prefill chunk's positions (the next prompt token,
   or the sampled one after the last), a decode row's last token, a verify row's last token and its accepted
   drafts (their states are the target's, computed with those drafts as input). Rejected drafts' rows are left
   out: their slots are written again by the next extend. The last row of a sequence that decodes next gives its
   first draft: the argmax of the layer's logits for the token after the one just emitted.
2. **Chain** (K - 1 forwards, one row per drafting sequence): the layer applied to its own output state and its
   last draft, one position further (as SGLang runs V3's one MTP layer for several steps). These latents sit at
   positions the next step computes (its last token and drafts); their blocks are taken now, from free blocks
   only (a short pool drafts fewer), and the next extend overwrites them with the target's.

Drafts are the layer's argmax, a point mass: verification's accept-if-equal rule (speculative.py) is then
exactly speculative sampling's min(1, p/q) test, and the tokens are the target's whatever the drafts. A block
taken from the prefix cache holds the latents of the sequence that computed it, the last one paired with that
sequence's next token: it can only make a draft worse, never an output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.sequence import SequenceStatus

if TYPE_CHECKING:
    from collections.abc import Sequence as Seq

    from deepseek_mcp.inference.engine.scheduler import Scheduler, SchedulerOutput
    from deepseek_mcp.inference.engine.sequence import Sequence

MAX_SPECULATIVE_TOKENS = 3  # the layer is trained for one step ahead; chained further its drafts rarely hold


class DraftRunner(Protocol):
    def draft(self, seqs: Seq[ScheduledSeq], hidden_rows: Seq[int], chained: bool = False) -> torch.Tensor: ...


def draft_room(seq: Sequence, k: int, max_model_len: int) -> int:
    """Drafts a decoding sequence can use: k, less what its max_tokens and the model length leave."""
    return max(0, min(k, seq.params.max_tokens - seq.num_output_tokens - 1, max_model_len - seq.num_tokens - 1))


class MTPDrafter:
    """Sets `draft_ids` of the step's sequences that decode next (up to k each) with the MTP layer."""

    def __init__(self, runner: DraftRunner):
        self.runner = runner
        self.forwards = 0  # MTP forwards run (extend and chained), for the benchmark

    def draft_step(self, out: SchedulerOutput, scheduler: Scheduler, k: int) -> None:
        ext: list[ScheduledSeq] = []
        rows: list[int] = []  # each MTP input token's state: its row among the step's new tokens
        drafting: list[tuple[int, Sequence, int]] = []  # (MTP row, sequence, drafts it may take)
        first = 0
        for seq, sched in zip(out.seqs, out.scheduled, strict=True):
            base, first = first, first + len(sched.token_ids)
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished, aborted or preempted: its latents are not needed
            end = min(seq.num_computed_tokens, seq.num_tokens - 1)  # positions < end are final, token end known
            count = end - sched.start_pos
            if count <= 0:
                continue
            if seq.num_tokens - seq.num_computed_tokens == 1:
                room = draft_room(seq, k, scheduler.max_model_len)
                if room:
                    drafting.append((len(ext), seq, room))
            ext.append(ScheduledSeq(seq.token_ids[sched.start_pos + 1 : end + 1], sched.start_pos, seq.block_table))
            rows.extend(range(base, base + count))
        if not ext:
            return
        logits = self.runner.draft(ext, rows)  # [len(ext), V]; a step only prefilling writes its latents too
        self.forwards += 1
        if not drafting:
            return
        picked = logits[[i for i, _, _ in drafting]].argmax(-1).tolist()
        drafts = {id(seq): [t] for (_, seq, _), t in zip(drafting, picked, strict=True)}
        chain = drafting  # (row of its state in the last MTP output, sequence, room)
        for j in range(1, k):
            # the layer at t = P + j - 1 (P: the last token's position) reads draft j and its own state at t - 1
            chain = [(i, seq, room) for i, seq, room in chain
                     if room > j and scheduler.reserve(seq, seq.num_tokens + j - 1)]
            if not chain:
                break
            batch = [ScheduledSeq([drafts[id(seq)][-1]], seq.num_tokens + j - 2, seq.block_table)
                     for _, seq, _ in chain]
            logits = self.runner.draft(batch, [i for i, _, _ in chain], chained=True)  # [len(chain), V]
            self.forwards += 1
            for (_, seq, _), t in zip(chain, logits.argmax(-1).tolist(), strict=True):
                drafts[id(seq)].append(t)
            chain = [(n, seq, room) for n, (_, seq, room) in enumerate(chain)]
        for _, seq, room in drafting:
            seq.draft_ids = drafts[id(seq)][:room]
