"""Schemas whose shortest instance is long (minLength, minItems) are taken whenever that instance fits the budget,
with a tight shortest-completion length; a refusal names the keyword and the tokens it needs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_constrained import RandomModel, check_calls, fresh_seed, validate

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.factory import ConstraintFactory
from deepseek_mcp.inference.constrained.processors import GrammarProcessor
from deepseek_mcp.inference.text.tokenizer import Tokenizer

LONG_STRING = {"type": "string", "minLength": 200}
MANY_INTS = {"type": "array", "items": {"type": "integer"}, "minItems": 100}
LONG_ARG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 300}}, "required": ["text"]}


@pytest.mark.parametrize("max_tokens", [1000, 300, 400])
def test_long_shortest_instances_are_accepted(factory: ConstraintFactory, max_tokens: int) -> None:
    for schema in (LONG_STRING, MANY_INTS):
        proc = factory.for_response_format({"type": "json_schema", "schema": schema}, max_tokens)
        assert isinstance(proc, GrammarProcessor) and proc.min_tokens <= max_tokens
    call = factory.for_tools([{"name": "write", "inputSchema": LONG_ARG}], "required", max_tokens)
    assert isinstance(call, GrammarProcessor)


def test_shortest_completions_are_tight(factory: ConstraintFactory) -> None:
    """A minLength string is filled with long character runs (up to 128 characters a token), not single bytes."""
    string = factory.for_response_format({"type": "json_schema", "schema": LONG_STRING}, 300)
    assert isinstance(string, GrammarProcessor) and string.min_tokens <= 2 + 200 // 64 + 2
    ints = factory.for_response_format({"type": "json_schema", "schema": MANY_INTS}, 300)
    assert isinstance(ints, GrammarProcessor) and ints.min_tokens <= 2 * 100 + 3  # "[", 100 x ("d", ","), "]", EOS
    call = factory.for_tools([{"name": "write", "inputSchema": LONG_ARG}], "required", 300)
    assert isinstance(call, GrammarProcessor) and call.min_tokens <= 24
    huge = factory.for_response_format({"type": "json_schema", "schema": {"type": "string", "minLength": 20000}}, 400)
    assert isinstance(huge, GrammarProcessor) and huge.min_tokens <= 2 + 20000 // 128 + 4


@pytest.mark.parametrize(("schema", "max_tokens"), [(LONG_STRING, 40), (MANY_INTS, 260)])
def test_random_model_fills_long_instances_within_budget(factory: ConstraintFactory, tok: Tokenizer,
                                                         schema: dict[str, Any], max_tokens: int) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    proc = factory.for_response_format({"type": "json_schema", "schema": schema}, max_tokens)
    out = model.generate(proc, max_tokens)
    ctx = f"seed={seed}"
    assert len(out) <= max_tokens and out[-1] == tok.eos_id and proc.is_terminated, ctx
    assert not proc.over_budget and proc.error is None, ctx
    validate(json.loads(tok.decode(out[:-1])), schema)


def test_random_model_long_tool_argument(factory: ConstraintFactory, tok: Tokenizer) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    proc = factory.for_tools([{"name": "write", "inputSchema": LONG_ARG}], "required", 48)
    out = model.generate(proc, 48)
    assert len(out) <= 48 and proc.is_terminated and not proc.over_budget, f"seed={seed}"
    check_calls(tok.decode(out), {"write": LONG_ARG}, f"seed={seed}")


def test_refusals_name_the_keyword_and_its_tokens(factory: ConstraintFactory) -> None:
    with pytest.raises(ConstraintError, match=r"max_tokens=150 is too small: the shortest valid output needs \d+ "
                                              r"tokens; minItems 100 at # \(response_format\) needs \d+ tokens"):
        factory.for_response_format({"type": "json_schema", "schema": MANY_INTS}, 150)
    nested = {"type": "object", "properties": {"doc": {"type": "string", "minLength": 5000}}, "required": ["doc"]}
    with pytest.raises(ConstraintError, match=r"too small.*; minLength 5000 at #/properties/doc \(tool 'save'\) "
                                              r"needs \d+ tokens"):
        factory.for_tools([{"name": "save", "inputSchema": nested}], "required", 20)
    endless = {"type": "array", "items": {"type": "integer"}, "minItems": 5000}
    with pytest.raises(ConstraintError, match=r"no complete output within the 2048 tokens.*minItems 5000 at # "
                                              r"\(response_format\) needs more than the 2048 tokens"):
        factory.for_response_format({"type": "json_schema", "schema": endless}, 4000)


def test_fill_resumes_after_a_partial_character(factory: ConstraintFactory, tok: Tokenizer) -> None:
    """Seed 4219451349 (a CI failure) writes the lead byte of a multi-byte character: no run token is allowed
    until it completes, and the planner gave up filling the string (then one byte per token overran 40)."""
    model = RandomModel(factory.vocab.vocab_size, 4219451349)
    proc = factory.for_response_format({"type": "json_schema", "schema": LONG_STRING}, 40)
    out = model.generate(proc, 40)
    assert len(out) <= 40 and out[-1] == tok.eos_id and proc.is_terminated and not proc.over_budget
    validate(json.loads(tok.decode(out[:-1])), LONG_STRING)
