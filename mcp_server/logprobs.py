"""Log-probabilities in the responses, and how a stream hands each token's entry out exactly once, in order.

Every generated token has one entry: reasoning, answer, tool-call and control tokens (`</think>`, the tool-call
markers, `<｜end▁of▁sentence｜>`) alike, as vLLM reports them; a chat response lists them all in
`logprobs.content` (OpenAI reports content tokens only, having no reasoning or markers in its text).

A stream attaches an entry to the chunk that completes its token's text. The text is held back twice before it
is sent (the engine holds a possible stop string, the parser a possible marker), so `StreamLogprobs.take`
hands out an entry only once the output up to the end of its token's text has been resolved by the parser;
the stream gives each delta the entries of the tokens whose text ends within it (the parser's events say
where their text ends), the step's last delta the rest of that step (a marker after its text), and carries
them to the next delta when the step produced none (a marker, a tool's name). The choice's last chunk (with
`finish_reason`) carries the rest: tokens cut by a stop string, a final stop token. Joined, the chunks'
entries are the non-streamed list: each entry once, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.mcp_server.request_processors import LogprobRecorder


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None: not recorded
    top: list[tuple[int, float]]
    offset: int  # where the token's text starts in the output text
    end: int  # where it ends (a stop string can cut it: then past the text)


class TokenEnds:
    """Where each generated token's text ends in the output text, by the engine's own incremental decoder
    (a stop token adds only what an unfinished character held back, as the engine's StopChecker does). A token
    that completes no character yet ends where the next token's text ends (None until then)."""

    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self._decoder = tokenizer.incremental_decoder()
        eos = None if params.ignore_eos else tokenizer.eos_id
        self._stops = frozenset(params.stop_token_ids) | ({eos} if eos is not None else frozenset())
        self.ends: list[int | None] = []
        self.starts: list[int] = []  # the text decoded before each token
        self.length = 0
        self._waiting: list[int] = []  # tokens whose character is not complete yet

    def extend(self, token_ids: list[int]) -> None:
        for t in token_ids[len(self.ends):]:
            self.starts.append(self.length)
            text = self._decoder.flush() if t in self._stops else self._decoder.step(t)
            self.length += len(text)
            if text or t in self._stops:
                for k in self._waiting:
                    self.ends[k] = self.length
                self._waiting = []
                self.ends.append(self.length)
            else:
                self._waiting.append(len(self.ends))
                self.ends.append(None)


def all_logprobs(recorder: LogprobRecorder, tokenizer: Any, params: SamplingParams, token_ids: list[int],
                 text_length: int) -> list[TokenLogprob]:
    """Every generated token's entry (the non-streamed list)."""
    ends = TokenEnds(tokenizer, params)
    ends.extend(token_ids)
    return [TokenLogprob(t, lp, top, min(ends.starts[k], text_length), ends.length if e is None else e)
            for k, ((t, lp, top), e) in enumerate(zip(recorder.entries(token_ids), ends.ends, strict=True))]


class StreamLogprobs:
    """Per streamed choice: `take(token_ids, resolved)` returns the entries not handed out yet whose token's
    text ends within the first `resolved` characters of the output (what has been sent or is being sent)."""

    def __init__(self, recorder: LogprobRecorder, tokenizer: Any, params: SamplingParams) -> None:
        self.recorder = recorder
        self.ends = TokenEnds(tokenizer, params)
        self.taken = 0

    def take(self, token_ids: list[int], resolved: int) -> list[TokenLogprob]:
        self.ends.extend(token_ids)
        k, ends = self.taken, self.ends.ends
        while k < len(token_ids) and (end := ends[k]) is not None and end <= resolved:
            k += 1
        if k == self.taken:
            return []
        out = [TokenLogprob(t, lp, top, self.ends.starts[j], ends[j] or 0)
               for j, (t, lp, top) in enumerate(self.recorder.entries(token_ids[:k], self.taken), self.taken)]
        self.taken = k
        return out


def _finite(logprob: float | None) -> float:
    if logprob is None or not math.isfinite(logprob):
        return -9999.0  # OpenAI's value for "as good as impossible"; JSON has no -inf
    return logprob


def chat_logprobs(entries: list[TokenLogprob], tokenizer: Any) -> dict[str, Any]:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""

    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(i, v) for i, v in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], tokenizer: Any) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (the `logprobs` most likely, plus the
    sampled token: up to logprobs + 1 entries, as OpenAI documents), text_offset (into the choice's text)."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        text = tokenizer.decode([e.token_id])
        tokens.append(text)
        values.append(_finite(e.logprob))
        top = {tokenizer.decode([i]): _finite(v) for i, v in e.top}
        top.setdefault(text, _finite(e.logprob))
        tops.append(top)
        offsets.append(e.offset)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
