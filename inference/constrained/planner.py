"""Shortest valid completions of a grammar-matcher state (budget steering plans with these)."""

from __future__ import annotations

import string

import numpy as np
import torch
import xgrammar as xgr

from deepseek_mcp.inference.constrained.lexer import ESCAPE, OUTSIDE, STRING, Lex, lex_step
from deepseek_mcp.inference.constrained.vocab import GrammarVocab


class _Walk:
    """Mutable state of one planning walk: the op budget, a bitmask buffer, and, per open string, when each
    byte was last used."""

    def __init__(self, ops: int, mask: torch.Tensor) -> None:
        self.ops = ops
        self.mask = mask  # [1, ceil(V/32)] int32
        self.words = mask.numpy()[0]
        self.clock = 0
        self.used: dict[int, int] = {}
        self.skip = 0  # bytes to write before searching for a way to close the string again
        self.start = 0  # clock when the open string started
        self.no_fill = False  # filling the open string with character runs failed: do not retry it
        self.fill: list[int] = []  # the rest of the runs that fill the open string
        self.fill_tokens = 0  # the most run tokens a fill may take (set by Planner.plan)

    def fork(self) -> _Walk:
        w = _Walk(self.ops, self.mask)
        w.clock, w.used, w.skip, w.start = self.clock, dict(self.used), self.skip, self.start
        w.no_fill, w.fill, w.fill_tokens = self.no_fill, list(self.fill), self.fill_tokens
        return w

    def allowed(self, m: xgr.GrammarMatcher, pool: np.ndarray) -> np.ndarray:
        """pool [n] int64 ids -> [n] bool: which the matcher allows next."""
        self.ops -= 1
        m.fill_next_token_bitmask(self.mask)
        return ((self.words[pool >> 5] >> (pool & 31)) & 1).astype(bool)


def completes(matcher: xgr.GrammarMatcher, tokens: list[int]) -> bool:
    """Does `tokens` complete the grammar from `matcher`'s state (left unchanged)?"""
    f = matcher.fork()
    return all(f.accept_token(t) for t in tokens) and f.is_terminated()


class Planner:
    """Short valid completions of a grammar-matcher state, as token ids ending with EOS. Stateless, shared.

    A greedy walk over single-byte tokens guided by a JSON lexer. Inside a string: close it if the grammar
    lets us; a key or value with few allowed next bytes (enum, key names, date digits) is a choice weighed by
    lookahead; a character class writes the byte used least recently in this string, so repetitions (an
    e-mail's local part, a fraction's digits) give way to the byte that ends them ('@', 'Z', ...). Outside
    strings: close a call or container if allowed, take xgrammar's forced jump-forward text, and at a real
    choice (value type, tool name) finish greedily after each of the first `lookahead` candidates and keep the
    shortest (a value string only up to its closing quote, a value inside a container up to its end: the rest
    does not depend on it; one digit stands for all). A string that must grow before it may close (minLength)
    is filled with the longest runs of one character the grammar allows (up to 128 characters a token). The
    byte plan is then re-tokenized with BPE and verified on a forked matcher.
    """

    def __init__(self, vocab: GrammarVocab, *, lookahead: int = 6, max_bytes: int = 2048,
                 max_ops: int = 60000) -> None:
        self.vocab = vocab
        self.lookahead = lookahead
        self.max_bytes = max_bytes
        self.max_ops = max_ops
        bt = vocab.byte_token

        def ids(chars: str) -> list[int]:
            return [bt[ord(c)] for c in chars]

        def rest(first: str, exclude: str = "") -> str:
            return "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in first + exclude)

        high = [bt[b] for b in range(0x80, 0x100)]
        t = vocab.tools
        self.specials = frozenset(t.all_ids) | {vocab.eos_id}
        self.quote = bt[ord('"')]
        first = ',:1234567890"{[ntf-.eE+' + string.ascii_lowercase + string.ascii_uppercase + "_"
        # Candidate pools in order of preference, as id arrays; closers first (position 0.. in `outside`).
        outside = [t.calls_end, t.call_end, *ids("}]")]
        outside += [*ids(first + rest(first)), *high, t.call_begin, t.sep, t.calls_begin]
        # Closers, then ',': a complete value is never made shorter to finish by extending it.
        self.n_closers = 5
        self.digits = slice(6, 16)  # '1'..'9', '0' in `outside`: equivalent first bytes of a number
        self.minus = 4 + first.index("-")  # never shorter than a number that may start with a digit
        inside = '"' + "@.:-/_" + string.digits + string.ascii_lowercase + string.ascii_uppercase
        self.outside = np.array(outside, dtype=np.int64)
        self.inside = np.array([*ids(inside + rest(inside, "\\")), *high], dtype=np.int64)
        self.escape = np.array(ids('n"\\/bfrtu'), dtype=np.int64)
        self.reps = np.array(ids('"a0.-@:/A_'), dtype=np.int64)  # one byte per common class + separators
        self.search_depth = 3
        self.search_after = 12
        # Runs of one printable character ("    ", "----", up to 128 bytes), longest first, after the quote: a
        # string that must grow (minLength) is filled with the fewest tokens.
        runs = [t for t, b in enumerate(vocab.token_bytes)
                if len(b) >= 2 and len(set(b)) == 1 and 0x20 <= b[0] < 0x7F and b[0] not in b'"\\']
        runs.sort(key=lambda t: -len(vocab.token_bytes[t]))
        self.runs = np.array([self.quote, *runs], dtype=np.int64)

    def lex(self, lex: Lex, token: int) -> Lex:
        return Lex() if token in self.specials else lex_step(lex, self.vocab.token_bytes[token])

    def plan(self, matcher: xgr.GrammarMatcher, lex: Lex, max_ops: int | None = None,
             max_tokens: int | None = None) -> list[int] | None:
        """Completion of `matcher` (left unchanged) given the lexer state; None when none was found within
        max_bytes / max_ops (grammar-mask computations: the planner's cost, each ~0.1 ms at V3's vocabulary).
        `max_tokens`: a plan longer than this is of no use to the caller, so a string fill (whose run tokens are
        final tokens) gives up past it instead of trying up to max_bytes runs."""
        mask = torch.empty((1, (self.vocab.vocab_size + 31) // 32), dtype=torch.int32)
        ops = self.max_ops if max_ops is None else max_ops
        walk = _Walk(ops, mask)
        walk.fill_tokens = self.max_bytes if max_tokens is None else max(0, min(self.max_bytes, max_tokens))
        raw = self._run(matcher.fork(), lex, walk, True, self.max_bytes)
        return None if raw is None else self._compress(matcher, raw)

    def _run(self, m: xgr.GrammarMatcher, lex: Lex, walk: _Walk, lookahead: bool, limit: int,
             to_close: bool = False, stop_depth: int | None = None) -> list[int] | None:
        """Greedy completion (bytes + control tokens). `to_close`: stop once the open string closes;
        `stop_depth`: once the value started at that container depth is complete."""
        out: list[int] = []
        eos = self.vocab.eos_id
        while len(out) <= limit and walk.ops > 0:
            if to_close and lex.mode == OUTSIDE:
                return out
            if stop_depth is not None and lex.mode == OUTSIDE and (
                    len(lex.stack) < stop_depth or len(lex.stack) == stop_depth and lex.after == ","):
                return out  # the value being weighed is complete: what follows does not depend on it
            if m.is_terminated():
                return out
            if m.is_completed() and m.accept_token(eos):
                out.append(eos)
                return out
            try:
                jump = m.find_jump_forward_string()
            except UnicodeDecodeError:  # the forced bytes end inside a character: walk them byte by byte
                jump = ""
            if jump:
                data = jump.encode("utf-8", "surrogateescape")
                if m.accept_string(data):
                    out.extend(self.vocab.byte_token[b] for b in data)
                    lex = self._lex_walk(lex, data, walk)
                    continue
            token = self._choose(m, lex, walk, lookahead, limit - len(out))
            if token is None:
                return None
            m.accept_token(token)
            out.append(token)
            lex = Lex() if token in self.specials else self._lex_walk(lex, self.vocab.token_bytes[token], walk)
        return None

    def _lex_walk(self, lex: Lex, data: bytes, walk: _Walk) -> Lex:
        for b in data:
            new = lex_step(lex, bytes((b,)))
            if lex.mode == OUTSIDE and new.mode == STRING:
                walk.used, walk.skip, walk.start = {}, 0, walk.clock  # a new string: forget the last one
                walk.no_fill, walk.fill = False, []
            elif new.mode == STRING:
                walk.clock += 1
                walk.used[b] = walk.clock
            lex = new
        return lex

    def _choose(self, m: xgr.GrammarMatcher, lex: Lex, walk: _Walk, lookahead: bool, budget: int) -> int | None:
        to_close = False
        if lex.mode == STRING:
            ok = walk.allowed(m, self.inside)
            if ok[0]:  # the closing quote
                return self.quote
            few = self.inside[ok]
            # A real choice to weigh: a key (it decides the value that follows) or the first byte of a value
            # (an enum); otherwise a character class or a format's next digit: no lookahead.
            if len(few) > self.lookahead or not lookahead or not (lex.key or walk.clock == walk.start):
                return self._fill(m, walk) or self._toward_quote(m, walk) or self._least_recent(few, walk)
            cands, to_close = few.tolist(), not lex.key
        elif lex.mode == ESCAPE:
            ok = walk.allowed(m, self.escape)
            return int(self.escape[ok][0]) if ok.any() else None
        else:
            ok = walk.allowed(m, self.outside)
            if ok[self.digits].any():  # one digit stands for all (and for '-')
                first_digit = self.digits.start + int(np.argmax(ok[self.digits]))
                ok[self.digits], ok[self.minus] = False, False
                ok[first_digit] = True
            cands = self.outside[ok][: self.lookahead if lookahead else 1].tolist()
            if ok[: self.n_closers].any():
                return cands[0]
        if len(cands) <= 1:
            return cands[0] if cands else None
        best, best_len = cands[0], min(budget, 256) + 1
        # A value inside a container is weighed up to its end (linear, not quadratic, in an array of many
        # items); a tool name or a top-level value up to the end of the output.
        stop_depth = len(lex.stack) if lex.mode == OUTSIDE and lex.stack else None
        for t in cands:  # one-level lookahead: finish greedily after each candidate, keep the shortest
            f = m.fork()
            f.accept_token(t)
            branch = walk.fork()
            after = self._lex_walk(lex, self.vocab.token_bytes[t], branch)
            rest = self._run(f, after, branch, False, best_len - 2, to_close, stop_depth)
            walk.ops = branch.ops
            if rest is not None and len(rest) + 1 < best_len:
                best, best_len = t, len(rest) + 1
        return best

    def _fill(self, m: xgr.GrammarMatcher, walk: _Walk) -> int | None:
        """In a string that cannot close yet: the first of the run tokens (longest allowed at each step) after
        which it can, e.g. a minLength met with 64-character runs; None, and no retry in this string, when runs
        do not get there (a pattern that needs other characters)."""
        if walk.fill:
            return walk.fill.pop(0)
        if walk.no_fill:
            return None
        f = m.fork()
        seq: list[int] = []
        while len(seq) < walk.fill_tokens and walk.ops > 0:  # e.g. an e-mail's local part: runs never close it
            ok = walk.allowed(f, self.runs)
            if ok[0]:
                walk.fill = seq[1:]
                return seq[0] if seq else None
            runs = self.runs[1:][ok[1:]]
            if not len(runs):
                if not seq:  # none allowed right now (inside a multi-byte character): retry after the next byte
                    return None
                break
            f.accept_token(int(runs[0]))
            seq.append(int(runs[0]))
        walk.no_fill = True
        return None

    def _toward_quote(self, m: xgr.GrammarMatcher, walk: _Walk) -> int | None:
        """After `search_after` bytes of a string that still cannot close: the first byte of the shortest run of
        up to `search_depth` representative bytes after which it may (iterative deepening); None if there is
        none (then skip the search for a few bytes)."""
        if walk.clock - walk.start < self.search_after:  # most strings close on their own by then (formats)
            return None
        if walk.skip > 0:
            walk.skip -= 1
            return None
        for depth in range(1, self.search_depth + 1):
            found = self._dfs(m, walk, depth)
            if found is not None:
                return found
        walk.skip = self.search_depth - 1
        return None

    def _dfs(self, m: xgr.GrammarMatcher, walk: _Walk, depth: int) -> int | None:
        if walk.ops <= 0:  # the plan's budget holds inside the search too
            return None
        ok = walk.allowed(m, self.reps)  # reps[0] is the quote
        if ok[0]:
            return self.quote
        if depth == 0:
            return None
        for r in self.reps[1:][ok[1:]].tolist():
            m.accept_token(r)
            found = self._dfs(m, walk, depth - 1)
            m.rollback(1)
            if found is not None:
                return r
        return None

    def _least_recent(self, allowed: np.ndarray, walk: _Walk) -> int | None:
        best, best_at = None, walk.clock + 1
        for t in allowed.tolist():
            at = walk.used.get(self.vocab.token_bytes[t][0], -1)
            if at < 0:
                return t
            if at < best_at:
                best, best_at = t, at
        return best

    def _compress(self, matcher: xgr.GrammarMatcher, raw: list[int]) -> list[int]:
        """Re-tokenize the byte-level plan with BPE (fewer tokens); keep it only if the matcher accepts it."""
        out: list[int] = []
        run: list[int] = []
        for t in [*raw, -1]:
            if t >= 0 and t not in self.specials:
                run.append(t)
                continue
            if run:
                out.extend(self._encode_run(run))
                run = []
            if t >= 0:
                out.append(t)
        if len(out) >= len(raw):
            return raw
        return out if completes(matcher, out) else raw

    def _encode_run(self, run: list[int]) -> list[int]:
        """BPE of a run of single-byte tokens. The run may start inside a character (the model wrote its lead
        byte) or end inside one: those bytes stay single-byte tokens, the valid UTF-8 between them is encoded."""
        data = b"".join(self.vocab.token_bytes[r] for r in run)
        for head in range(min(4, len(data)) + 1):
            for tail in range(min(4, len(data) - head) + 1):
                try:
                    text = data[head:len(data) - tail].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                return [*run[:head], *self.vocab.tokenizer.encode_text(text), *run[len(run) - tail:]]
        return run

