"""POST /v1/completions: a plain prompt continued as raw text (no chat template, no parsing), or fill-in-the-
middle with `suffix`: BOS <｜fim▁begin｜> prompt <｜fim▁hole｜> suffix <｜fim▁end｜>, the model writes the hole."""

from __future__ import annotations

import json
import time
from typing import Any

from mcp_server.api.errors import invalid, unsupported
from mcp_server.api.generation import Choice, Plan, raw_prompt_ids
from mcp_server.api.openai_chat import refuse_unsupported
from mcp_server.api.sse import Write, sse


def completion_plan(req: Any, tokenizer: Any) -> Plan:
    refuse_unsupported(req)
    if req.logprobs or req.top_logprobs:
        raise unsupported("logprobs", "/v1/completions returns no log-probabilities; use /v1/chat/completions "
                                      "with logprobs: true")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise invalid("give one prompt per request (a string); batches of prompts are not supported, use "
                          "concurrent requests", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if req.suffix is not None:
            raise invalid("suffix needs a text prompt, not token ids", "suffix")
        vocab = getattr(tokenizer, "vocab_size", None)
        if not prompt or any(not isinstance(t, int) or t < 0 or (vocab and t >= vocab) for t in prompt):
            raise invalid("prompt token ids must be a non-empty list of ids in the vocabulary", "prompt")
        ids = list(prompt)
    else:
        ids = raw_prompt_ids(tokenizer, prompt, req.suffix)
    return Plan(prompt_ids=ids, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=req.top_k, seed=req.seed, stop=req.stop_list(), presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, n=req.n)


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt = choices[0].run.prompt_tokens if choices else 0
    completion = sum(len(c.run.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": choices[0].run.cached_tokens if choices else 0}}


def finish(c: Choice) -> str:
    return "length" if c.finish == "length" else "stop"


def completion_response(choices: list[Choice], model: str, response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "deepseek-mcp",
            "choices": [{"index": c.index, "text": c.run.text, "finish_reason": finish(c), "logprobs": None}
                        for c in choices],
            "usage": usage(choices)}


class TextStream:
    def __init__(self, model: str, response_id: str, write: Write, include_usage: bool) -> None:
        self.model, self.id, self.write, self.include_usage = model, response_id, write, include_usage
        self.created = int(time.time())
        self.choices: list[Choice] = []

    async def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> None:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model, "system_fingerprint": "deepseek-mcp", "choices": choices}
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        await self.write(sse(json.dumps(body, ensure_ascii=False)))

    async def on_item(self, index: int, item: Any) -> None:
        if isinstance(item, Choice):
            self.choices.append(item)
            await self.chunk([{"index": index, "text": "", "finish_reason": finish(item), "logprobs": None}])
        elif item[0]:
            await self.chunk([{"index": index, "text": item[0], "finish_reason": None, "logprobs": None}])

    async def end(self) -> None:
        if self.include_usage:
            await self.chunk([], usage=usage(sorted(self.choices, key=lambda c: c.index)))
        await self.write(b"data: [DONE]\n\n")
