"""POST /v1/completions: a plain prompt continued as raw text (no chat template, no parsing), or fill-in-the-
middle with `suffix`: BOS <｜fim▁begin｜> prompt <｜fim▁hole｜> suffix <｜fim▁end｜>, the model writes the hole.

`prompt` may be a batch (a list of strings or of token-id lists): every prompt's n samples run together,
choice `index` = prompt index x n + sample. The legacy integer `logprobs` (0-20) returns `tokens`,
`token_logprobs`, `top_logprobs` (the N most likely and the sampled token) and `text_offset` (into the
choice's `text`, as vLLM counts it), streamed or not."""

from __future__ import annotations

import json
import time
from typing import Any

from deepseek_mcp.inference.text.bounded import PromptTooLong
from deepseek_mcp.inference.text.template import BOS
from deepseek_mcp.mcp_server.api.errors import invalid
from deepseek_mcp.mcp_server.api.openai_chat import refuse_unsupported
from deepseek_mcp.mcp_server.api.sse import Write, sse
from deepseek_mcp.mcp_server.engine_request import with_speculative
from deepseek_mcp.mcp_server.failures import RequestError
from deepseek_mcp.mcp_server.logprobs import TokenLogprob, completion_logprobs
from deepseek_mcp.mcp_server.pipeline import Choice, Item, Plan


def _prompts(req: Any, tokenizer: Any, limit: int | None) -> list[list[int]]:
    """`prompt` as OpenAI allows it: a string, a list of strings, a list of token ids, or a list of such lists.
    `limit`: PromptTooLong for a prompt past it, before the rest of its text is encoded."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [raw_prompt_ids(tokenizer, prompt, req.suffix, limit)]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    nested = not all(isinstance(p, int) for p in prompt)
    if not nested:
        prompt = [prompt]
    vocab = getattr(tokenizer, "vocab_size", None)
    out = []
    for i, p in enumerate(prompt):
        where = f"prompt[{i}]" if nested else "prompt"
        if isinstance(p, str):
            try:
                out.append(raw_prompt_ids(tokenizer, p, req.suffix, limit))
            except PromptTooLong as e:
                raise PromptTooLong(e.num_tokens, e.limit, where if len(prompt) > 1 else "") from None
            continue
        if req.suffix is not None:
            raise invalid("suffix needs a text prompt, not token ids", "suffix")
        if not p or any(not isinstance(t, int) or t < 0 or (vocab and t >= vocab) for t in p):
            raise invalid(f"{where}: token ids must be a non-empty list of ids in the vocabulary", where)
        out.append(list(p))
    return out


def logprobs_of(req: Any) -> int | None:
    """The legacy integer `logprobs` (0-20): the sampled token's log-probability and the N most likely."""
    if req.top_logprobs is not None:
        raise invalid("/v1/completions takes the number of alternatives in logprobs (an integer), not "
                      "top_logprobs", "top_logprobs")
    value = req.logprobs
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise invalid("logprobs must be an integer between 0 and 20 on /v1/completions", "logprobs")
    return value


def completion_plan(req: Any, tokenizer: Any, max_prompt_tokens: int | None = None) -> Plan:
    """The request as a plan of raw prompts; `max_prompt_tokens`: PromptTooLong past it (ModelHost.tokenize runs
    this on a worker thread with the context's limit)."""
    refuse_unsupported(req)
    return Plan(prompts=_prompts(req, tokenizer, max_prompt_tokens), max_tokens=req.max_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop_list(),
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, n=req.n,
                logprobs=logprobs_of(req))


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """Prompt tokens summed over the prompts (each counted once, not once per sample)."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.run.prompt_tokens for c in firsts)
    completion = sum(len(c.run.token_ids) for c in choices)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": sum(c.run.cached_tokens for c in firsts)}}
    return with_speculative(out, [c.run for c in choices])


def finish(c: Choice) -> str:
    return "length" if c.run.finish_reason in ("length", "time") else "stop"


def completion_response(plan: Plan, choices: list[Choice], model: str, response_id: str,
                        tokenizer: Any) -> dict[str, Any]:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "deepseek-mcp",
            "choices": [{"index": c.index, "text": c.run.text, "finish_reason": finish(c),
                         "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs, tokenizer)}
                        for c in sorted(choices, key=lambda c: c.index)],
            "usage": usage(choices, plan.n)}


class TextStream:
    """text_completion chunks: choice i (prompt i // n) as it decodes; with logprobs each chunk carries the
    entries of the tokens whose text it completes, the last one (finish_reason) the rest."""

    def __init__(self, plan: Plan, model: str, response_id: str, write: Write, include_usage: bool,
                 tokenizer: Any) -> None:
        self.plan, self.model, self.id, self.write, self.include_usage = plan, model, response_id, write, \
            include_usage
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self.sent: dict[int, int] = {}
        self.pending: dict[int, list[TokenLogprob]] = {}

    async def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> None:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model, "system_fingerprint": "deepseek-mcp", "choices": choices}
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        await self.write(sse(json.dumps(body, ensure_ascii=False)))

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None
        self.sent[index] = self.sent.get(index, 0) + len(entries)
        return completion_logprobs(entries, self.tokenizer)

    async def on_item(self, index: int, item: Item | Choice) -> None:
        pending = self.pending.setdefault(index, [])
        if isinstance(item, Choice):
            self.choices.append(item)
            rest = (item.logprobs or [])[self.sent.get(index, 0):]
            await self.chunk([{"index": index, "text": "", "finish_reason": finish(item),
                               "logprobs": self._logprobs(index, rest)}])
            return
        text, _, entries = item
        pending += entries
        if text:
            carried, pending[:] = list(pending), []
            await self.chunk([{"index": index, "text": text, "finish_reason": None,
                               "logprobs": self._logprobs(index, carried)}])

    async def end(self) -> None:
        if self.include_usage:
            await self.chunk([], usage=usage(self.choices, self.plan.n))
        await self.write(b"data: [DONE]\n\n")


def raw_prompt_ids(tokenizer: Any, prompt: str, suffix: str | None, limit: int | None = None) -> list[int]:
    """BOS + prompt, or fill-in-the-middle: BOS <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>.
    `limit`: PromptTooLong once the ids certainly pass it (the rest of the text is not encoded)."""
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.token_to_id(BOS)
    if suffix is None:
        return [bos, *_encode(tokenizer, prompt, limit, 1)]
    ids = [tokenizer.token_to_id(t) for t in ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")]
    if any(i is None for i in ids):
        raise RequestError("suffix (fill-in-the-middle) needs the FIM tokens, which this tokenizer lacks")
    begin, hole, end = ids
    head = _encode(tokenizer, prompt, limit, 4)
    return [bos, begin, *head, hole, *_encode(tokenizer, suffix, limit, 4 + len(head)), end]


def _encode(tokenizer: Any, text: str, limit: int | None, used: int) -> list[int]:
    """`tokenizer.encode(text)` within what is left of `limit` after `used` ids (counted in its PromptTooLong)."""
    if limit is None:
        return tokenizer.encode(text)
    try:
        return tokenizer.encode(text, limit=limit - used)
    except PromptTooLong as e:
        raise PromptTooLong(used + e.num_tokens, limit) from None
