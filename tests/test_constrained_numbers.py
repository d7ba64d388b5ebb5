"""Constrained JSON numbers are finite doubles within the schema's bounds, and the checkers refuse the rest.

A random model at temperature 1, pushed toward digits and exponents, must never get `1e999`, a 400-digit number
or an out-of-range value through the grammar; `check_call` / `check_json` / the parser treat NaN, Infinity and
overflowing literals as invalid."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import xgrammar as xgr
from test_constrained import RandomModel, check_calls, fresh_seed, validate

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.factory import ConstraintFactory
from deepseek_mcp.inference.constrained.schema import check_schema
from deepseek_mcp.inference.text.finite_json import loads_finite, non_finite
from deepseek_mcp.inference.text.parse import parse_arguments
from deepseek_mcp.inference.text.tokenizer import Tokenizer
from deepseek_mcp.mcp_server.tool_specs import ToolSpec, check_call, check_json

NUMBERS: dict[str, Any] = {"type": "object", "properties": {
    "free": {"type": "number"},
    "count": {"type": "integer"},
    "low": {"type": "number", "minimum": 2.5},
    "high": {"type": "integer", "exclusiveMaximum": -3},
    "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "maybe": {"type": ["number", "null"], "minimum": -1, "maximum": 1},
    "sevens": {"type": "integer", "multipleOf": 7, "minimum": -70, "maximum": 700},
    "thirds": {"type": "integer", "multipleOf": 3},
    "any": {},
    "list": {"type": "array", "items": {"type": "number"}, "minItems": 2},
}, "required": ["free", "count", "low", "high", "ratio", "maybe", "sevens", "thirds", "any", "list"]}


def number_bias(tok: Tokenizer) -> dict[int, float]:
    """Push the model toward long digit runs and exponents (what overflows a double)."""
    pieces = ["999", "9", "e", "E", "e+", "E+", "1", "00", ".", "-"]
    return {tid: 6.0 for p in pieces for tid in tok.encode(p)[:1]}


def assert_finite_and_valid(value: Any, schema: dict[str, Any], ctx: str) -> None:
    json.dumps(value, allow_nan=False)  # raises on inf / nan
    assert non_finite(value) is None, ctx
    validate(value, schema)


def test_grammar_writes_only_finite_numbers(factory: ConstraintFactory) -> None:
    schema = check_schema(NUMBERS, "t", want_object=True)
    grammar = factory.cache.json(schema, "t").grammar

    def complete(text: str) -> bool:
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(text) and m.is_completed()

    good = {"free": "-1.5e99", "count": "-999999999999999", "low": "2.5", "high": "-4", "ratio": "0.5",
            "maybe": "null", "sevens": "-70", "thirds": "-999999999999999", "any": "[1e-99,{\"a\":-0.25}]",
            "list": "[0,1E+2]"}

    def obj(**over: str) -> str:
        return "{" + ",".join(f'"{k}":{over.get(k, v)}' for k, v in good.items()) + "}"

    assert complete(obj())
    for key, bad in [("free", "1e999"), ("free", "1e100000"), ("free", "9" * 400), ("free", "1." + "9" * 40),
                     ("count", "1" + "0" * 15), ("count", "-" + "9" * 400), ("low", "2.4"), ("low", "9" * 40),
                     ("high", "-3"), ("ratio", "0"), ("ratio", "1"), ("maybe", "1.5"), ("maybe", "1e999"),
                     ("sevens", "8"), ("sevens", "707"), ("thirds", "4"), ("thirds", "1" * 18),
                     ("any", "1e999"), ("any", "[NaN]"),
                     ("any", "{\"a\":-Infinity}"), ("list", "[1,1e309]")]:
        assert not complete(obj(**{key: bad})), (key, bad)


def test_random_model_forced_calls_hold_finite_numbers(factory: ConstraintFactory, tok: Tokenizer) -> None:
    tools = [{"name": "measure", "inputSchema": NUMBERS}]
    bias = number_bias(tok)
    for max_tokens in (64, 90):
        seed = fresh_seed()
        model = RandomModel(factory.vocab.vocab_size, seed)
        proc = factory.for_tools(tools, "required", max_tokens)
        out = model.generate(proc, max_tokens, bias=bias)
        ctx = f"seed={seed} max_tokens={max_tokens}"
        for call in check_calls(tok.decode(out), {"measure": NUMBERS}, ctx):
            assert_finite_and_valid(call.arguments, NUMBERS, ctx)
            args, error = check_call("measure", call.raw, {"measure": ToolSpec("measure", "", NUMBERS)})
            assert args == call.arguments and error == "", ctx


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "schema": {"type": "array", "items": {"type": "number"}, "minItems": 3}},
    {"type": "json_schema", "schema": {"type": "number", "minimum": 1e12}},
])
def test_random_model_json_replies_hold_finite_numbers(factory: ConstraintFactory, tok: Tokenizer,
                                                       fmt: dict[str, Any]) -> None:
    bias = number_bias(tok)
    schema = fmt.get("schema", {"type": "object"})
    for _ in range(2):
        seed = fresh_seed()
        model = RandomModel(factory.vocab.vocab_size, seed)
        proc = factory.for_response_format(fmt, 48)
        assert proc is not None
        out = model.generate(proc, 48, bias=bias)
        text = tok.decode(out[:-1])
        value, error = check_json(text, schema)
        assert error is None, f"seed={seed} {text!r}: {error}"
        assert_finite_and_valid(value, schema, f"seed={seed} {text!r}")


def test_checkers_refuse_non_finite_numbers() -> None:
    spec = {"f": ToolSpec("f", "", {"type": "object", "properties": {"x": {"type": "number"}}})}
    for raw in ['{"x":1e999}', '{"x":-1e999}', '{"x":NaN}', '{"x":Infinity}', '{"x":-Infinity}',
                '{"x":' + "9" * 400 + "}"]:
        args, error = check_call("f", raw, spec)
        assert args is None and "not a finite double" in error, raw
        value, problem = check_json(raw, None)
        assert value is None and "not a finite double" in (problem or ""), raw
        parsed, why = parse_arguments(raw)
        assert parsed is None and "not a finite double" in (why or ""), raw
    args, error = check_call("f", {"x": math.inf}, spec)  # already parsed (by a lenient parser)
    assert args is None and "x: inf is not a finite number" in error
    assert check_call("f", '{"x":1.5e300}', spec) == ({"x": 1.5e300}, "")
    assert loads_finite("[1, -0.0, 1e308]") == [1, -0.0, 1e308]


def test_multiple_of_with_a_range_is_exact_or_refused(factory: ConstraintFactory) -> None:
    schema = check_schema({"type": "integer", "multipleOf": 7, "exclusiveMinimum": 0, "maximum": 30}, "t",
                          want_object=False)
    assert schema["enum"] == [7, 14, 21, 28]
    with pytest.raises(ConstraintError, match=r"'multipleOf' 7 with a range at #/properties/n allows \d+ values"):
        factory.for_tools([{"name": "f", "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "multipleOf": 7, "minimum": 0}}}}], "required", 64)
