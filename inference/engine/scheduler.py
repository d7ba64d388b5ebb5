"""Continuous-batching scheduler: decodes, chunked prefill and admission under a token budget per step.

Each `schedule()` builds one model step:
1. every running sequence that is decoding gets its one new token, then its drafts to verify (speculative
   decoding) as far as the budget and the free blocks allow: drafts never preempt;
2. what is left of the `max_num_batched_tokens` budget is shared, max-min fairly (`fair_shares`), by the
   running sequences still prefilling and the waiting sequences that free slots (`max_num_seqs`) can take,
   first come first served: a prompt shorter than the fair share is computed whole in this step, the longer
   ones split the rest. So a new request is admitted in the next step whatever else is prefilling, and its
   first token takes about `prompt / (budget / prompts in prefill)` steps: a long prompt neither stalls the
   decodes nor holds new requests out. Each waiting sequence starts from its longest cached prefix; one the
   pool cannot hold stops admission (it keeps its place);
3. budget a share did not use (a request the pool could not take, a preempted row) tops up the prefills in
   row order, as far as free blocks allow.
When a running sequence needs a block and the pool is empty, the newest running sequence is preempted: its
blocks are released and it goes back to the front of the waiting queue, to be recomputed later (its full
blocks usually still sit in the prefix cache). Nothing is admitted in a step that preempted.

`postprocess()` takes the sampled tokens, registers newly completed blocks in the prefix cache, checks
stops and releases finished sequences' blocks.
"""

from __future__ import annotations

from collections import abc, deque
from dataclasses import dataclass

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.block_manager import BlockManager, chain_block_hashes
from deepseek_mcp.inference.engine.sequence import Sequence, SequenceStatus, SeqUpdate


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: list[Sequence]
    scheduled: list[ScheduledSeq]  # row b is seqs[b]'s share of the step (what the runner consumes)
    sample_rows: list[int]  # rows whose last new token is the sequence's last token: they sample
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})"
                " so every running sequence can decode each step"
            )
        capacity = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = min(max_model_len or capacity, capacity)
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the newest is preempted first
        self._by_id: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative decoding: drafts verified, accepted, and the steps verifying
        self.num_accepted_tokens = 0
        self.num_verify_steps = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens; the limit is {self.max_model_len - 1} "
                "(cache capacity / model length; raise cache_tokens)"
            )
        seq.cap_length(self.max_model_len)
        seq.status = SequenceStatus.WAITING
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> SeqUpdate | None:
        """Stop a request now and release its blocks; None if it is unknown or already finished."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        return seq.finish("abort")

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        chosen: dict[Sequence, int] = {}  # seq -> new tokens this step, in row order
        preempted: list[Sequence] = []

        # 1. every decoding sequence gets its token (the budget always covers them: it is >= max_num_seqs); then its
        #    drafts to verify, as far as the budget left over and the free blocks allow: a draft never preempts
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        for seq in decoding:
            if seq.status is SequenceStatus.RUNNING and self._make_room(seq, 1, chosen, preempted):
                chosen[seq] = 1
        spare = self._budget_left(chosen)
        for seq in decoding:
            if seq not in chosen:  # preempted: its drafts were dropped with its blocks
                continue
            room = (len(seq.block_table) + self.bm.num_free_blocks) * self.block_size - seq.num_tokens
            seq.draft_ids = seq.draft_ids[: max(min(spare, room), 0)]
            spare -= len(seq.draft_ids)
            chosen[seq] += len(seq.draft_ids)
            seq.block_table.extend(self.bm.allocate(self._blocks_needed(seq, chosen[seq])))

        # 2. the rest of the budget is shared by the prompts in prefill, running or about to be admitted
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        slots = self.max_num_seqs - len(self.running)
        candidates = [] if preempted else self._admissible(prefilling, max(slots, 0))  # (seq, cached tokens)
        admits = [seq for seq, _ in candidates]
        demands = [s.num_tokens - s.num_computed_tokens for s in prefilling]
        demands += [seq.num_tokens - cached for seq, cached in candidates]
        shares = fair_shares(demands, self._budget_left(chosen))
        for seq, share in zip(prefilling, shares[: len(prefilling)], strict=True):
            if share and seq.status is SequenceStatus.RUNNING and self._make_room(seq, share, chosen, preempted):
                chosen[seq] = share
        for seq, share in zip(admits, shares[len(prefilling) :], strict=True):
            if preempted or share == 0:  # nothing is admitted in a step that preempted
                break
            num_new = self._admit(seq, share)
            if num_new == 0:  # the pool cannot hold it now: it keeps its place at the head
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            chosen[seq] = num_new

        # 3. budget left unused (a share that could not be admitted, a preempted row) tops up the prefills in order
        left = self._budget_left(chosen)
        for seq in chosen:
            if left == 0:
                break
            start = seq.num_computed_tokens + chosen[seq]
            room = (len(seq.block_table) + self.bm.num_free_blocks) * self.block_size - start
            extra = min(seq.num_tokens - start, left, room)
            if extra > 0:
                seq.block_table.extend(self.bm.allocate(self._blocks_needed(seq, chosen[seq] + extra)))
                chosen[seq] += extra
                left -= extra

        seqs = list(chosen)
        scheduled: list[ScheduledSeq] = []
        sample_rows: list[int] = []
        for row, seq in enumerate(seqs):
            start, n = seq.num_computed_tokens, chosen[seq]
            drafts = seq.draft_ids if start + 1 == seq.num_tokens else []  # only a decoding row verifies drafts
            ids = seq.token_ids[start : start + n - len(drafts)] + drafts
            scheduled.append(ScheduledSeq(ids, start, seq.block_table, 1 + len(drafts)))  # live list
            if start + n - len(drafts) == seq.num_tokens:
                sample_rows.append(row)
        return SchedulerOutput(seqs, scheduled, sample_rows, preempted)

    def postprocess(self, out: SchedulerOutput, sampled_token_ids: abc.Sequence[int | abc.Sequence[int]]
                    ) -> list[SeqUpdate]:
        """Advance the step's sequences; `sampled_token_ids[i]` belongs to row `out.sample_rows[i]`: its token, or
        for a row that verified drafts the tokens it emits (the drafts it accepted, then the target's own)."""
        if len(sampled_token_ids) != len(out.sample_rows):
            raise ValueError(f"{len(sampled_token_ids)} sampled tokens for {len(out.sample_rows)} rows")
        token_of_row = dict(zip(out.sample_rows, sampled_token_ids, strict=True))
        updates: list[SeqUpdate] = []
        for row, (seq, sched) in enumerate(zip(out.seqs, out.scheduled, strict=True)):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            emitted = token_of_row.get(row)
            tokens = [] if emitted is None else [int(emitted)] if isinstance(emitted, int) else list(emitted)
            drafts = sched.num_logits - 1
            if drafts:  # the last token and the accepted drafts hold valid latents; the rejected drafts' slots
                # roll back: the next tokens overwrite them. Their blocks stay in the live list (append-only, as
                # the runner and the tensor-parallel codec mirror it) and take the sequence's next tokens.
                accepted = len(tokens) - 1
                if not 0 <= accepted <= drafts:
                    raise ValueError(f"{len(tokens)} tokens emitted for {drafts} drafts")
                seq.num_computed_tokens += 1 + accepted
                seq.num_drafted += drafts
                seq.num_accepted += accepted
                seq.num_verify_steps += 1
                self.num_draft_tokens += drafts
                self.num_accepted_tokens += accepted
                self.num_verify_steps += 1
            else:
                seq.num_computed_tokens += len(sched.token_ids)
            seq.draft_ids = []
            if not tokens:
                self._register_full_blocks(seq)
                continue
            update = seq.append_tokens(tokens)  # before the blocks are hashed: accepted drafts are in them
            # a stop among the emitted tokens drops the rest: never count latents past the tokens kept
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            self._register_full_blocks(seq)
            updates.append(update)
            if update.finished:
                self.running.remove(seq)
                del self._by_id[seq.request_id]
                self._release(seq)
        return updates

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for a running sequence's first `num_tokens` positions from free blocks only (nothing is
        preempted): the MTP drafter's latents ahead of the sequence, which its next step needs anyway. False,
        nothing taken, when the pool is short."""
        need = max(0, -(-num_tokens // self.block_size) - len(seq.block_table))
        if need > self.bm.num_free_blocks:
            return False
        if need:
            seq.block_table.extend(self.bm.allocate(need))
        return True

    # ---- helpers ------------------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        total = seq.num_computed_tokens + num_new
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def _budget_left(self, chosen: dict[Sequence, int]) -> int:
        return self.max_num_batched_tokens - sum(chosen.values())

    def _make_room(self, seq: Sequence, num_new: int, chosen: dict[Sequence, int], preempted: list[Sequence]) -> bool:
        """Blocks for `num_new` more tokens of a running sequence, preempting the newest running sequences while
        the pool is short (their rows leave `chosen`); False if `seq` itself had to go."""
        need = self._blocks_needed(seq, num_new)
        while need > self.bm.num_free_blocks:
            victim = self.running[-1]
            chosen.pop(victim, None)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        if need:
            seq.block_table.extend(self.bm.allocate(need))
        return True

    def _admissible(self, prefilling: list[Sequence], slots: int) -> list[tuple[Sequence, int]]:
        """The first `slots` waiting sequences, in order, passing over one whose next uncached block a running
        prefill (or one admitted before it here) is about to compute: admitted now it would compute the same
        block again; a step or a few later it takes it from the prefix cache (requests that share a system prompt
        arrive together)."""
        bs = self.block_size
        pending: set[bytes] = set()  # full blocks a prefill in flight has not computed yet

        def add(seq: Sequence, computed: int) -> None:
            pending.update(chain_block_hashes(seq.token_ids, bs, seq.block_hashes)[computed // bs :])

        for seq in prefilling:
            add(seq, seq.num_computed_tokens)
        out: list[tuple[Sequence, int]] = []  # with the tokens each would take from the prefix cache
        for seq in self.waiting:
            if len(out) == slots:
                break
            hashes = chain_block_hashes(seq.token_ids, bs, seq.block_hashes)
            cached = self._num_cached(seq)
            if cached // bs < (seq.num_tokens - 1) // bs and hashes[cached // bs] in pending:
                continue
            out.append((seq, cached))
            add(seq, cached)
        return out

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks a waiting sequence would start from (no references taken). The block holding the last
        token is never taken from the cache: its logits must be computed."""
        hashes = chain_block_hashes(seq.token_ids, self.block_size, seq.block_hashes)
        return self.bm.match_prefix(hashes[: (seq.num_tokens - 1) // self.block_size])

    def _num_cached(self, seq: Sequence) -> int:
        return len(self._cached_prefix(seq)) * self.block_size

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and blocks for its first chunk; returns the chunk
        length, or 0 if the pool cannot hold it now (nothing is taken then)."""
        bs = self.block_size
        cached = self._cached_prefix(seq)  # again: allocations earlier in this step may have evicted some
        num_cached = len(cached) * bs
        num_new = min(seq.num_tokens - num_cached, budget)
        need = -(-(num_cached + num_new) // bs) - len(cached)
        if need + self.bm.num_evictable_in(cached) > self.bm.num_free_blocks:
            return 0
        self.bm.acquire(cached)
        seq.block_table = cached + self.bm.allocate(need)
        seq.num_computed_tokens = num_cached
        seq.num_registered_blocks = len(cached)
        if seq.num_cached_tokens < 0:  # first admission: count it for the prefix hit rate
            seq.num_cached_tokens = num_cached
            self.bm.record_prefix_query(seq.num_tokens, num_cached)
        seq.status = SequenceStatus.RUNNING
        return num_new

    def _register_full_blocks(self, seq: Sequence) -> None:
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = chain_block_hashes(seq.token_ids, self.block_size, seq.block_hashes)
        for i in range(seq.num_registered_blocks, num_full):
            self.bm.register(seq.block_table[i], hashes[i])
        seq.num_registered_blocks = num_full

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.bm.free(seq.block_table)
        seq.block_table = []
        seq.draft_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0


def fair_shares(demands: abc.Sequence[int], budget: int) -> list[int]:
    """Split `budget` tokens among prefills wanting `demands` tokens, max-min fairly (water-filling): every
    demand below the common level is met in full, the others get the level; the remainder of the integer
    division goes to the earliest that still want more. A 1-token prompt beside a 20k-token one gets its token;
    the long prompt gets the rest. Each share is at least 1 while the budget covers one token per demand."""
    shares = [0] * len(demands)
    left = budget
    order = sorted(range(len(demands)), key=lambda i: demands[i])  # stable: ties keep their order
    for rank, i in enumerate(order):
        level = left // (len(demands) - rank)
        if demands[i] > level:  # this one and every longer one get the level
            capped = sorted(order[rank:])
            for j in capped:
                shares[j] = level
            for j in capped[: left - level * len(capped)]:
                shares[j] += 1
            return shares
        shares[i] = demands[i]
        left -= demands[i]
    return shares
