"""Schema-constrained decoding: a random model (random logits, temperature 1, through the processor) must always
produce tool calls that parse and validate, JSON that validates, and nothing else, within max_tokens; bad
schemas fail before generation. A few end-to-end runs go through the demo checkpoint and the AsyncEngine."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from helpers import fixtures_dir, fresh_seed

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.factory import ConstraintFactory
from deepseek_mcp.inference.constrained.lexer import OUTSIDE, Lex, lex_step
from deepseek_mcp.inference.constrained.processors import GrammarProcessor
from deepseek_mcp.inference.constrained.schema import constrained_tools
from deepseek_mcp.inference.constrained.tool_ban import ToolBan, marker_tail
from deepseek_mcp.inference.text.parse import StreamParser
from deepseek_mcp.inference.text.tokenizer import Tokenizer

FIXTURES = fixtures_dir()
TEMPLATE = FIXTURES / "deepseek_v31_chat_template.jinja"
CB, CE, B, E, SEP = 128806, 128807, 128808, 128809, 128814
THINK_END = 128799

# Realistic tool schemas: nesting, arrays, enums, required fields, bounded numbers, patterns, formats, anyOf,
# $ref recursion, tuples, maps, unicode.
CORPUS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city"]},
    "web_search": {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 3, "maxLength": 200},
        "filters": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"key": {"type": "string"}, "value": {"type": "number"}},
            "required": ["key", "value"]}},
        "safe": {"type": "boolean"}}, "required": ["query", "filters"]},
    "create_event": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "start": {"type": "string", "format": "date-time"},
        "day": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 3},
        "location": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "reminders": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1440}}},
        "required": ["title", "start", "attendees"]},
    "place_order": {"type": "object", "properties": {
        "customer": {"type": "object", "properties": {
            "id": {"type": "string", "pattern": "^C[0-9]{4}$"}, "vip": {"type": "boolean"}}, "required": ["id"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}}, "required": ["sku", "qty"]}},
        "notes": {"type": "string"}}, "required": ["customer", "items"]},
    "set_target": {"type": "object", "properties": {
        "target": {"anyOf": [{"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
                             {"type": "string", "enum": ["all", "none", "self"]}]},
        "mode": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}},
        "required": ["target", "mode"]},
    "tree": {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 10},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["label"]}},
        "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]},
    "misc": {"type": "object", "properties": {
        "version": {"const": "v1"}, "nick": {"type": ["string", "null"]},
        "scores": {"type": "object", "additionalProperties": {"type": "number"}},
        "point": {"type": "array", "prefixItems": [{"type": "number", "minimum": -90, "maximum": 90},
                                                   {"type": "number", "minimum": -180, "maximum": 180}],
                  "items": False, "minItems": 2},
        "ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}, "required": ["version", "point", "ratio"]},
    "no_params": {"type": "object", "properties": {}},
    "formats": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}, "ip": {"type": "string", "format": "ipv4"},
        "at": {"type": "string", "format": "time"}}, "required": ["id", "ip", "at"]},
    "props_count": {"type": "object", "additionalProperties": {"type": "integer", "multipleOf": 7},
                    "minProperties": 1, "maxProperties": 3, "propertyNames": {"pattern": "^[a-z]+$"}},
    "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "array", "minItems": 1, "items": {
            "type": "array", "items": {"type": "integer"}, "minItems": 1}}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    "enum_mixed": {"type": "object", "properties": {"v": {"enum": [1, "two", None, True, {"x": 1}]},
                                                    "city": {"type": "string", "enum": ["Zürich", "東京"]}},
                   "required": ["v", "city"]},
}


class RandomModel:
    """A random model: i.i.d. N(0, 1) logits sampled at temperature 1 (argmax of logits + Gumbel noise, drawn
    from a pre-generated bank to keep the test fast). `bias` adds to chosen logits (to push a behaviour)."""

    def __init__(self, vocab_size: int, seed: int, rows: int = 96) -> None:
        g = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(rows, vocab_size, generator=g)
        self.bank -= torch.empty(rows, vocab_size).exponential_(generator=g).log()  # + Gumbel(0, 1)
        self.rng = random.Random(seed)

    def generate(self, proc: Any, max_tokens: int, eos: int = 1, bias: dict[int, float] | None = None,
                 prepare: bool = True) -> list[int]:
        out: list[int] = []
        while len(out) < max_tokens:
            if prepare and hasattr(proc, "prepare"):
                proc.prepare(out)
            logits = self.bank[self.rng.randrange(len(self.bank))].clone()  # [V]
            for t, b in (bias or {}).items():
                logits[t] += b
            t = int(torch.argmax(proc(out, logits)))
            out.append(t)
            if t == eos:
                break
        if hasattr(proc, "update"):
            proc.update(out)
        return out


def parse_text(text: str, tools: list[str] | None, thinking: bool = False):
    parser = StreamParser(thinking=thinking, tools=tools)
    for i in range(0, len(text), 7):  # stream it in pieces, as the server does
        parser.feed(text[i:i + 7])
    parser.finish()
    return parser.result()


def validate(instance: Any, schema: dict[str, Any]) -> None:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(instance)


def assert_compact(raw: str) -> None:
    lex = Lex()
    for ch in raw:
        if lex.mode == OUTSIDE:
            assert not ch.isspace(), f"whitespace outside strings in {raw!r}"
        lex = lex_step(lex, ch.encode())


def check_calls(text: str, schemas: dict[str, dict[str, Any]], ctx: str) -> list[Any]:
    result = parse_text(text, list(schemas))
    assert result.complete, f"{ctx}: incomplete output {text!r}"
    assert result.tool_calls, f"{ctx}: no tool call in {text!r}"
    for call in result.tool_calls:
        assert call.valid and call.complete, f"{ctx}: {call.error} in {text!r}"
        validate(call.arguments, schemas[call.name])
        assert_compact(call.raw)
    assert result.content == "" and result.reasoning == "", f"{ctx}: stray text in {text!r}"
    return result.tool_calls


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and grammar


def test_vocab_as_xgrammar_sees_it(factory: ConstraintFactory, tok: Tokenizer) -> None:
    vocab = factory.vocab
    assert vocab.vocab_size == tok.vocab_size == 129280
    decoded = vocab.info.decoded_vocab
    rng = random.Random(fresh_seed())
    for tid in rng.sample(range(3, 128000), 2000):  # ids 0-2 are BOS / EOS / pad: special, below
        assert decoded[tid] == tok.piece_bytes(tid) == vocab.token_bytes[tid]
    assert [decoded[t] for t in (0, 1, 2)] == [vocab.token_bytes[t] for t in (0, 1, 2)] == [b"", b"", b""]
    special = set(vocab.info.special_token_ids)
    assert {0, 2, 128798, 128799, 128803, 128804, 128000, 129279} <= special  # never allowed as text
    assert not special & {CB, CE, B, E, SEP}  # the grammar can demand these ids ...
    assert all(decoded[t].startswith(b"\x00") for t in (CB, CE, B, E, SEP))  # ... and no JSON string holds them
    assert vocab.info.stop_token_ids == [tok.eos_id]
    assert [vocab.token_bytes[vocab.byte_token[b]] for b in range(256)] == [bytes((b,)) for b in range(256)]


def test_marker_tail_tracks_the_control_marker_prefix() -> None:
    assert marker_tail(0, b"ab<") == 1
    assert marker_tail(1, "｜".encode()[:1]) == 2 and marker_tail(2, "｜".encode()[1:2]) == 3
    assert marker_tail(1, b"x") == 0 and marker_tail(0, b"") == 0


@pytest.mark.skipif(not TEMPLATE.is_file(), reason=f"fixtures folder {FIXTURES} is absent")
def test_tool_grammar_matches_official_template_and_builtin_tag(factory: ConstraintFactory, tok: Tokenizer) -> None:
    jinja2 = pytest.importorskip("jinja2")
    tools = [{"type": "function", "function": {"name": n, "parameters": CORPUS[n]}} for n in ("get_weather", "tree")]
    calls = [("get_weather", {"city": "Paris", "days": 3}), ("tree", {"root": {"label": "a", "children": []}})]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": json.dumps(a, separators=(",", ":"))}}
        for n, a in calls]}]
    text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(TEMPLATE.read_text()).render(
        messages=msgs, bos_token="<｜begin▁of▁sentence｜>")
    body = text.split("<｜Assistant｜></think>", 1)[1]
    ids = tok.encode(body)
    assert ids[0] == CB and ids[-2:] == [CE, tok.eos_id]
    ours = xgr.GrammarMatcher(factory.cache.tools(constrained_tools(tools), True).grammar)
    assert all(ours.accept_token(t) for t in ids) and ours.is_terminated()
    # xgrammar's builtin deepseek_v3_1 tag describes the same text, but spells control tokens as strings and
    # lets JSON have free whitespace: it accepts the text, not our token ids; we build our own tag instead.
    builtin = xgr.get_model_structural_tag("deepseek_v3_1", tools=tools, tool_choice="required",
                                           reasoning="disabled")
    compiled = factory.cache._compiler.compile_structural_tag(builtin)
    m = xgr.GrammarMatcher(compiled)
    assert m.accept_string(body.removesuffix("<｜end▁of▁sentence｜>")) and m.is_completed()
    assert not xgr.GrammarMatcher(compiled).accept_token(CB)
    spaced = body.replace('{"city":"Paris"', '{ "city" : "Paris"')
    assert xgr.GrammarMatcher(compiled).accept_string(spaced.removesuffix("<｜end▁of▁sentence｜>"))
    m = xgr.GrammarMatcher(factory.cache.tools(constrained_tools(tools), True).grammar)
    assert not all(m.accept_token(t) for t in tok.encode(spaced))


# ---------------------------------------------------------------------------------------------------------
# Random model through the processor


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_required_call_always_valid_even_at_the_token_limit(factory: ConstraintFactory, tok: Tokenizer,
                                                            name: str) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    tools = [{"name": name, "inputSchema": CORPUS[name]}]
    probe = factory.for_tools(tools, "required", 4096)
    assert isinstance(probe, GrammarProcessor)
    for max_tokens in (probe.min_tokens, probe.min_tokens + 7, 72):
        proc = factory.for_tools(tools, "required", max_tokens)
        out = model.generate(proc, max_tokens)
        ctx = f"{name} max_tokens={max_tokens} seed={seed}"
        assert len(out) <= max_tokens and out[-1] == tok.eos_id, ctx
        assert proc.is_terminated and not proc.over_budget and proc.error is None, ctx
        if len(out) == max_tokens and max_tokens > probe.min_tokens:
            assert proc.steered, ctx
        check_calls(tok.decode(out), {name: CORPUS[name]}, ctx)


def test_plan_after_a_partial_character_stays_short(factory: ConstraintFactory, tok: Tokenizer) -> None:
    """The model may write a character's lead byte as its own token: the plan must finish that character and
    still be BPE-compressed (a byte-per-token plan once made the budget jump by ~30 tokens and cut the call)."""
    planner = factory.planner
    tools = [{"name": "create_event", "inputSchema": CORPUS["create_event"]}]  # dates follow: long plans
    prefix = [CB, B, *tok.encode("create_event"), SEP, *tok.encode('{"title":"Z')]
    for ch in "é東😀":
        lead = factory.vocab.byte_token[ch.encode()[0]]
        lengths = []
        for ids in (prefix, [*prefix, lead]):
            proc = factory.for_tools(tools, "required", 4096)
            proc.update(ids)
            matcher = proc._matcher
            lex = Lex()
            for t in ids:
                lex = planner.lex(lex, t)
            plan = planner.plan(matcher, lex)
            assert plan is not None and plan[-1] == tok.eos_id
            f = matcher.fork()
            assert all(f.accept_token(t) for t in plan) and f.is_terminated()
            lengths.append(len(plan))
        assert lengths[1] <= lengths[0] + 4, (ch, lengths)  # 3 continuation bytes + one token boundary


def _count_masks(monkeypatch) -> list[int]:
    """The planner's grammar-mask computations from now on, as count[0]."""
    from deepseek_mcp.inference.constrained import planner as planner_mod

    count = [0]
    allowed = planner_mod._Walk.allowed

    def counted(self, m, pool):
        count[0] += 1
        return allowed(self, m, pool)

    monkeypatch.setattr(planner_mod._Walk, "allowed", counted)
    return count


def test_plan_keeps_its_op_budget_in_a_string_that_cannot_close_soon(factory: ConstraintFactory,
                                                                     tok: Tokenizer, monkeypatch) -> None:
    """A string that may only close after a byte the quote search does not try ('q'): the search (iterative
    deepening over 10 representative bytes, up to ~1,100 grammar masks) once ignored the plan's op budget, so a
    plan meant to stop at max_ops ran on; with a few such plans per step a constrained step near max_tokens took
    tens of seconds (a CI run stalled in test_required_among_many_tools_and_named_choice)."""
    from deepseek_mcp.inference.constrained import planner as planner_mod

    fmt = {"type": "json_schema", "schema": {"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^[a0.@:/A_-]{3,}q$"}}, "required": ["s"]}}
    proc = factory.for_response_format(fmt, 4096)
    ids = tok.encode('{"s":"' + "a0.@:/A_-" * 2)
    proc.update(ids)
    lex = Lex()
    for t in ids:
        lex = factory.planner.lex(lex, t)
    count = _count_masks(monkeypatch)
    mask = torch.empty((1, (factory.vocab.vocab_size + 31) // 32), dtype=torch.int32)
    for budget in (5, 50, 300):
        walk = planner_mod._Walk(budget, mask)
        walk.clock = factory.planner.search_after  # this string has run long enough to search for its end
        count[0] = 0
        assert factory.planner._toward_quote(proc._matcher.fork(), walk) is None  # 'q' is not among the tries
        assert count[0] <= budget, (budget, count[0])
    for budget in (50, 400, 4000):  # and the whole plan
        count[0] = 0
        plan = factory.planner.plan(proc._matcher, lex, max_ops=budget)
        assert count[0] <= budget + 1, (budget, count[0])
        if plan is not None:  # whatever it found within the budget completes the grammar
            f = proc._matcher.fork()
            assert all(f.accept_token(t) for t in plan) and f.is_terminated()


BIG = {"type": "object", "properties": {f"x{i}": {"type": "string", "format": "date"} for i in range(8)},
       "required": [f"x{i}" for i in range(8)]}
JUMPY = {"type": "object", "properties": {"a": {"type": "string"}, "b": BIG, "c": {"type": "array", "items": BIG},
                                          "d": {"anyOf": [{"type": "null"}, BIG]}}, "required": ["a"]}


def test_structural_choices_never_outrun_the_budget(factory: ConstraintFactory, tok: Tokenizer) -> None:
    """Optional properties / array items / anyOf branches that each add ~100 tokens, and a model pushed towards
    structural tokens (quotes, commas, brackets) from a random step on: every call still closes in budget."""
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    rng = random.Random(seed)
    push = factory.vocab.structural_ids[:-6]  # not the control tokens / EOS
    tools = [{"name": "jumpy", "parameters": JUMPY}]
    for _ in range(12):
        max_tokens, start = rng.randrange(16, 140), rng.randrange(0, 60)
        proc = factory.for_tools(tools, "required", max_tokens)
        out: list[int] = []
        while len(out) < max_tokens and (not out or out[-1] != tok.eos_id):
            proc.prepare(out)
            logits = model.bank[model.rng.randrange(len(model.bank))].clone()
            if len(out) >= start:
                logits[push] += 12.0
            out.append(int(torch.argmax(proc(out, logits))))
        proc.update(out)
        ctx = f"seed={seed} max_tokens={max_tokens} push from {start}"
        assert not proc.over_budget and proc.is_terminated, ctx
        check_calls(tok.decode(out), {"jumpy": JUMPY}, ctx)


def test_required_among_many_tools_and_named_choice(factory: ConstraintFactory, tok: Tokenizer) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in CORPUS.items()]
    names: set[str] = set()
    for max_tokens in (40, 64, 64, 96, 128):
        proc = factory.for_tools(tools, "required", max_tokens)
        out = model.generate(proc, max_tokens)
        names |= {c.name for c in check_calls(tok.decode(out), CORPUS, f"many seed={seed}")}
    assert len(names) >= 2, f"seed={seed}: the random model should reach several tools, got {names}"
    for choice in ({"type": "function", "function": {"name": "place_order"}}, {"name": "place_order"}):
        proc = factory.for_tools(tools, choice, 80, parallel_tool_calls=False)
        calls = check_calls(tok.decode(model.generate(proc, 80)), CORPUS, f"named seed={seed}")
        assert [c.name for c in calls] == ["place_order"]
    # parallel calls: a strong push towards another call instead of closing the block
    proc = factory.for_tools(tools, {"name": "no_params"}, 60)
    calls = check_calls(tok.decode(model.generate(proc, 60, bias={B: 30.0})), CORPUS, f"parallel seed={seed}")
    assert len(calls) >= 3 and {c.name for c in calls} == {"no_params"}


def test_auto_text_then_call_and_budget_gate(factory: ConstraintFactory, tok: Tokenizer) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    schemas = {"get_weather": CORPUS["get_weather"], "web_search": CORPUS["web_search"]}
    tools = [{"name": n, "parameters": s} for n, s in schemas.items()]
    # plain random text: no block opener, no tool tokens, no spelled-out markers
    proc = factory.for_tools(tools, "auto", 40)
    out = model.generate(proc, 40, bias={E: 40.0, SEP: 40.0, B: 40.0})
    assert not proc.opened and not set(out) & {CB, CE, B, E, SEP}, out
    assert not parse_text(tok.decode(out), list(schemas)).tool_calls
    # pushed to open a block after some text: the call that follows is valid
    for max_tokens in (30, 60):
        proc = factory.for_tools(tools, "auto", max_tokens)
        assert isinstance(proc, GrammarProcessor)
        out = model.generate(proc, 5, eos=-1, prepare=False)  # five tokens of text first
        out = out + [CB]
        out += model.generate(_Resume(proc, out), max_tokens - len(out))
        proc.update(out)
        assert proc.opened and proc.is_terminated, f"seed={seed}"
        result = parse_text(tok.decode(out), list(schemas))
        assert result.complete and len(result.content) > 0, f"seed={seed}: {tok.decode(out)!r}"
        for call in result.tool_calls:
            assert call.valid, call.error
            validate(call.arguments, schemas[call.name])
    # a block is opened only while it can still be finished: push for it after `text` free tokens
    need = factory.for_tools(tools, "auto", 64).min_tokens
    for text, opens in ((2, True), (6, False)):
        proc = factory.for_tools(tools, "auto", need + 4)
        out = model.generate(proc, text, eos=-1, prepare=False)
        out += model.generate(_Resume(proc, out), need + 4 - text, bias={CB: 1e4})
        assert (CB in out) == opens and len(out) <= need + 4, f"seed={seed} {out}"
        if opens:
            proc.update(out)
            assert proc.is_terminated and proc.steered
            check_calls(tok.decode(out[text:]), schemas, f"auto gate seed={seed}")


class _Resume:
    """Feeds a processor the tokens generated before (`prefix`) plus the new ones."""

    def __init__(self, proc: Any, prefix: list[int]) -> None:
        self.proc, self.prefix = proc, prefix

    def prepare(self, out: list[int]) -> None:
        self.proc.prepare(self.prefix + out)

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        return self.proc(self.prefix + out, logits)


def test_none_never_calls(factory: ConstraintFactory, tok: Tokenizer) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    lt, bar = tok.encode("<")[0], tok.encode("｜")
    assert len(bar) == 1
    for tools in ([{"name": "get_weather", "parameters": CORPUS["get_weather"]}], []):
        proc = factory.for_tools(tools, "none", 64)
        assert isinstance(proc, ToolBan)
        # push hard towards every tool token and towards spelling "<｜" out of ordinary tokens
        bias = {t: 50.0 for t in (*range(CB, SEP + 1),)} | {lt: 20.0, bar[0]: 20.0}
        out = model.generate(proc, 64, bias=bias)
        text = tok.decode(out)
        assert not set(out) & set(range(CB, SEP + 1)), f"seed={seed}"
        assert "<｜" not in text and not parse_text(text, ["get_weather"]).tool_calls, f"seed={seed}: {text!r}"


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "schema": CORPUS["place_order"]},
    {"type": "json_schema", "json_schema": {"name": "tree", "schema": CORPUS["tree"]}},
    {"type": "json_schema", "schema": {"type": "array", "items": CORPUS["get_weather"], "minItems": 2}},
    {"type": "json_schema", "schema": {"type": "string", "enum": ["yes", "no", "maybe"]}},
    {"type": "json_schema", "schema": {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "boolean"}]}},
    {"type": "json_object"},
])
def test_response_format_always_validates(factory: ConstraintFactory, tok: Tokenizer, fmt: dict) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    schema = fmt.get("schema") or fmt.get("json_schema", {}).get("schema") or {"type": "object"}
    lengths = []
    for max_tokens in (24, 48, 200):
        try:
            proc = factory.for_response_format(fmt, max_tokens)
        except ConstraintError:
            assert max_tokens == 24, f"only the smallest budget may be too small for {schema}"
            continue
        assert proc is not None
        out = model.generate(proc, max_tokens)
        lengths.append(len(out))
        ctx = f"{schema} max_tokens={max_tokens} seed={seed}"
        assert len(out) <= max_tokens and out[-1] == tok.eos_id and proc.is_terminated, ctx
        text = tok.decode(out[:-1])
        value = json.loads(text)
        validate(value, schema)
        assert_compact(text)
        assert json.loads(json.dumps(value)) == value, ctx
    assert lengths, f"no budget fit {schema}"
    assert factory.for_response_format({"type": "text"}, 10) is None
    assert factory.for_response_format(None, 10) is None


def test_thinking_then_forced_call(factory: ConstraintFactory, tok: Tokenizer) -> None:
    seed = fresh_seed()
    model = RandomModel(factory.vocab.vocab_size, seed)
    tools = [{"name": "get_weather", "parameters": CORPUS["get_weather"]}]
    proc = factory.for_tools(tools, "required", 60, thinking=True)
    # it wants to stop or call at once (not allowed while reasoning) and never ends the reasoning by itself
    out = model.generate(proc, 60, bias={tok.eos_id: 50.0, CB: 50.0, THINK_END: -100.0})
    assert out.count(THINK_END) == 1 and proc.steered, f"seed={seed}"
    result = parse_text(tok.decode(out), ["get_weather"], thinking=True)
    assert result.complete and len(result.reasoning) > 0, f"seed={seed}"
    assert "<｜tool" not in result.reasoning and "<｜end" not in result.reasoning, f"seed={seed}"
    assert len(result.tool_calls) >= 1 and all(c.valid for c in result.tool_calls)
    for call in result.tool_calls:
        validate(call.arguments, CORPUS["get_weather"])
    fmt = {"type": "json_schema", "schema": CORPUS["get_weather"]}
    proc = factory.for_response_format(fmt, 40, thinking=True)
    out = model.generate(proc, 40)
    assert THINK_END in out and out[-1] == tok.eos_id, f"seed={seed}"
    validate(json.loads(tok.decode(out[out.index(THINK_END) + 1:-1])), CORPUS["get_weather"])


def test_prepare_is_optional_and_idempotent(factory: ConstraintFactory) -> None:
    seed = fresh_seed()
    tools = [{"name": "web_search", "parameters": CORPUS["web_search"]}]
    runs = []
    for mode in ("none", "once", "twice"):
        model = RandomModel(factory.vocab.vocab_size, seed)
        proc = factory.for_tools(tools, "required", 50)
        out: list[int] = []
        while len(out) < 50 and (not out or out[-1] != 1):
            for _ in range({"none": 0, "once": 1, "twice": 2}[mode]):
                proc.prepare(out)
            out.append(int(torch.argmax(proc(out, model.bank[model.rng.randrange(96)].clone()))))
        runs.append(out)
    assert runs[0] == runs[1] == runs[2], f"seed={seed}"


# ---------------------------------------------------------------------------------------------------------
# Errors before generation, and the grammar cache


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}], "required",
     "tool 'f': not a valid JSON Schema at properties/a/type"),
    ([{"name": "f", "parameters": {"type": "object", "required": "a"}}], "required", "tool 'f': not a valid"),
    ([{"name": "f", "parameters": {"type": "string"}}], "required", "tool 'f': tool arguments must be a JSON object"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {"type": "null"}}}}}], "auto",
     "tool 'f': 'not' at #/properties/a is not supported"),
    ([{"name": "g", "parameters": {"type": "object", "if": {}, "then": {}}}], "required", "tool 'g': 'if'"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "array", "uniqueItems": True}}}}], "required", "'uniqueItems' at #/properties/a"),
    ([{"name": "f", "parameters": {"type": "object", "allOf": [{"type": "object"}, {"required": []}]}}],
     "required", "'allOf' with several schemas"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "https://x.org/s.json"}}}}],
     "required", "not a local reference"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string",
                                                                          "pattern": "^(?!x)"}}}}],
     "required", "lookaround"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}}],
     "required", "required property 'b' at # not defined"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "number",
                                                                          "multipleOf": 0.5}}}}],
     "required", "'multipleOf' at #/properties/n is only supported with an integer divisor"),
    ([{"name": "bad name!", "parameters": {}}], "required", "a tool name must be"),
    ([{"name": "f", "parameters": {}}, {"name": "f", "parameters": {}}], "required", "duplicate tool name"),
    ([{"name": "f", "parameters": {}}], {"name": "g"}, "names 'g', which is not among the offered tools"),
    ([], "required", "needs at least one tool"),
    ([{"name": "f", "parameters": {}}], "sometimes", "tool_choice must be"),
])
def test_bad_tools_fail_before_generation(factory: ConstraintFactory, tools: list, choice: Any,
                                          message: str) -> None:
    with pytest.raises(ConstraintError, match=None) as info:
        factory.for_tools(tools, choice, 64)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_response_format_and_budget(factory: ConstraintFactory) -> None:
    with pytest.raises(ConstraintError, match="response_format: not a valid JSON Schema"):
        factory.for_response_format({"type": "json_schema", "schema": {"type": 5}}, 64)
    with pytest.raises(ConstraintError, match="needs a 'schema'"):
        factory.for_response_format({"type": "json_schema"}, 64)
    with pytest.raises(ConstraintError, match="type must be 'json_schema', 'json_object' or 'text'"):
        factory.for_response_format({"type": "yaml"}, 64)
    with pytest.raises(ConstraintError, match=r"max_tokens=10 is too small: the shortest valid output needs \d+"):
        factory.for_tools([{"name": "place_order", "parameters": CORPUS["place_order"]}], "required", 10)
    with pytest.raises(ConstraintError, match="'contains'"):
        factory.for_response_format({"type": "json_schema", "schema": {"type": "array", "contains": {}}}, 64)


def test_grammar_cache_is_an_lru_on_canonical_schemas(tok: Tokenizer) -> None:
    factory = ConstraintFactory(tok, cache_size=2)
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    a_reordered = {"properties": {"y": {"type": "string"}, "x": {"type": "integer"}}, "type": "object"}
    factory.for_tools([{"name": "a", "parameters": a}], "required", 64)
    factory.for_tools([{"type": "function", "function": {"name": "a", "parameters": a_reordered}}], "required", 64)
    assert (factory.cache.hits, factory.cache.misses) == (1, 1)
    factory.for_tools([{"name": "a", "parameters": a}], "required", 64, parallel_tool_calls=False)  # other mode
    factory.for_response_format({"type": "json_schema", "schema": a}, 64)  # evicts the first
    assert (factory.cache.hits, factory.cache.misses, len(factory.cache)) == (1, 3, 2)
    factory.for_tools([{"name": "a", "parameters": a}], "required", 64)
    assert factory.cache.misses == 4


def test_custom_tool_grammars_without_nul(factory: ConstraintFactory) -> None:
    from deepseek_mcp.inference.constrained.grammars import input_ebnf, without_nul
    from deepseek_mcp.inference.text.tools import ToolSpec

    # control tokens reach the grammar as text starting with NUL: no custom tool's class may hold it
    assert without_nul('root ::= [\\0-\\b] [^a] "[\\0]" [a\\0] [\\x00-z]') == \
        'root ::= [\\x01-\\b] [^\\0a] "[\\0]" [a] [\\x01-z]'
    empty = {"type": "object", "properties": {}}
    for grammar in (("regex", r"[\s\S]*"), ("regex", r"x.*"), ("lark", 'start: /(.|\\n)*/')):
        spec = ToolSpec("t", "", empty, grammar=grammar)
        assert "\\0-" not in input_ebnf(spec)
        proc = factory.for_tools([spec], "required", 32)  # plans: the shortest call is a few tokens
        assert proc.min_tokens < 12
    with pytest.raises(ConstraintError, match="lark grammar"):
        factory.for_tools([ToolSpec("t", "", empty, grammar=("lark", "start: nothing"))], "required", 32)
    with pytest.raises(ConstraintError, match="grammar syntax"):
        input_ebnf(ToolSpec("t", "", empty, grammar=("ebnf", 'root ::= "a"')))


# ---------------------------------------------------------------------------------------------------------
# End to end on the demo checkpoint (random weights, real vocabulary) through the AsyncEngine


def test_demo_model_end_to_end(factory: ConstraintFactory) -> None:
    anyio = pytest.importorskip("anyio")
    from deepseek_mcp.inference.engine.async_engine import AsyncEngine
    from deepseek_mcp.inference.engine.engine import Engine
    from deepseek_mcp.inference.engine.sampling import SamplingParams

    engine = Engine.from_pretrained(None, device="cpu")
    tok = engine.tokenizer
    seed = fresh_seed()
    tools = [{"name": n, "parameters": CORPUS[n]} for n in ("get_weather", "web_search")]
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>Weather in Paris?<｜Assistant｜></think>")
    fmt = {"type": "json_schema", "schema": CORPUS["place_order"]}
    jobs = [("required", factory.for_tools(tools, "required", 32), 32),
            ("named", factory.for_tools(tools, {"name": "web_search"}, 48), 48),
            ("json", factory.for_response_format(fmt, 48), 48),
            ("auto", factory.for_tools(tools, "auto", 24), 24)]

    async def main() -> list[list[int]]:
        async with AsyncEngine(engine, max_num_seqs=4) as aeng:
            results: list[list[int]] = [[] for _ in jobs]

            async def one(i: int) -> None:
                _, proc, max_tokens = jobs[i]
                params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed + i)
                async for out in aeng.stream(prompt, params, logits_processors=[proc]):
                    results[i] = list(out.token_ids)

            async with anyio.create_task_group() as tg:
                for i in range(len(jobs)):
                    tg.start_soon(one, i)
            return results

    outs = anyio.run(main)
    schemas = {n: CORPUS[n] for n in ("get_weather", "web_search")}
    for (kind, proc, max_tokens), out in zip(jobs, outs, strict=True):
        proc.update(out)
        ctx = f"{kind} seed={seed}"
        assert len(out) <= max_tokens, ctx
        if kind in ("required", "named"):
            calls = check_calls(tok.decode(out), schemas, ctx)
            assert kind == "required" or {c.name for c in calls} == {"web_search"}
        elif kind == "json":
            assert out[-1] == tok.eos_id, ctx
            validate(json.loads(tok.decode(out[:-1])), CORPUS["place_order"])
        else:
            result = parse_text(tok.decode(out), list(schemas))
            assert all(c.valid for c in result.tool_calls), ctx


def test_fill_of_a_string_runs_never_close_is_bounded_by_bytes(factory: ConstraintFactory, tok: Tokenizer,
                                                               monkeypatch) -> None:
    """An e-mail in an array (`bench/constrained.py`'s create_event attendees): runs of one character never let
    its local part close, so the fill tried run after run up to max_bytes tokens (2,048 grammar masks, ~0.4 s a
    plan at V3's vocabulary; three candidate plans a step made a batch-4 tool call 5x slower to plan), though a
    candidate plan is only of use within the tokens left. Given `max_tokens`, the fill stops there; the plan
    found is the same short completion."""

    fmt = {"type": "json_schema", "schema": {"type": "object", "properties": {
        "to": {"type": "array", "items": {"type": "string", "format": "email"}}}, "required": ["to"]}}
    proc = factory.for_response_format(fmt, 4096)
    ids = tok.encode('{"to":["a')
    proc.update(ids)
    lex = Lex()
    for t in ids:
        lex = factory.planner.lex(lex, t)
    count = _count_masks(monkeypatch)
    plan = factory.planner.plan(proc._matcher, lex, max_ops=4000, max_tokens=63)
    assert plan is not None and len(plan) <= 12
    f = proc._matcher.fork()
    assert all(f.accept_token(t) for t in plan) and f.is_terminated()
    assert count[0] <= 200, count[0]  # 2,000+ before
    count[0] = 0
    assert factory.planner.plan(proc._matcher, lex, max_ops=4000) == plan  # no limit: the same, at full cost
