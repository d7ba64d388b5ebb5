"""Numbers the grammar may write: only JSON numbers that parse to finite doubles, within the schema's bounds.

xgrammar's JSON grammar lets a number have any count of digits and any exponent (`-1e999` parses to -inf in
Python; `json.dumps` then writes `-Infinity`, or `null` through pydantic), and a half-bounded range (`minimum`
only) leaves the other side unbounded. Two rewrites close that, both exact for what they allow:
- the schema: a number or integer bounded on one side gets the other bound (`FINITE_BOUND`), so xgrammar's
  range grammar has a finite digit count; `multipleOf` with a range (xgrammar ignores multipleOf there) becomes
  the `enum` of the multiples, or is refused when there are too many;
- the grammar text: xgrammar's `basic_integer` / `basic_number` rules (unbounded numbers and any-typed values)
  get bounded digit counts: integers below 10**15 in magnitude (exact doubles), numbers with at most 15 integer
  and 15 fraction digits and a 1-2 digit exponent (so below 1e115 in magnitude); an integer `multipleOf` up to
  MAX_AUTOMATON_STEP without a range gets our own digit-bounded remainder automaton (xgrammar's has no bound;
  a larger step keeps xgrammar's, whose integers can be long, and the checkers refuse one beyond a double).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from deepseek_mcp.inference.constrained.errors import ConstraintError

FINITE_BOUND = 10**15  # magnitudes the grammar writes for a number bounded on one side
MAX_ENUMERATED_MULTIPLES = 1024
MAX_AUTOMATON_STEP = 32  # multipleOf without a range: our digit-bounded automaton has step x 15 rules
_MULTIPLE = "\x00multipleOf "  # a const no schema means: NUL cannot be typed in a tool schema by accident

# xgrammar 0.2.x's rules, and their bounded replacements (same names, same structure).
_BOUNDED_RULES = {
    'basic_integer ::= (("0") | (basic_integer_1 [1-9] [0-9]*))':
        'basic_integer ::= (("0") | (basic_integer_1 [1-9] [0-9]{0,14}))',
    'basic_number_2 ::= (("0") | ([1-9] [0-9]*))': 'basic_number_2 ::= (("0") | ([1-9] [0-9]{0,14}))',
    'basic_number_3 ::= ("" | ("." basic_number_digits{1, -1}))':
        'basic_number_3 ::= ("" | ("." basic_number_digits{1, 15}))',
    'basic_number_5 ::= ("" | ([eE] basic_number_4 basic_number_digits{1, -1}))':
        'basic_number_5 ::= ("" | ([eE] basic_number_4 basic_number_digits{1, 2}))',
}


def bounded_number_rules(ebnf: str) -> str:
    """xgrammar's JSON-schema EBNF with its generic number rules bounded (see the module docstring)."""
    lines = ebnf.split("\n")
    names = {rule.split(" ::= ", 1)[0]: rule for rule in _BOUNDED_RULES}
    for i, line in enumerate(lines):
        name = line.split(" ::= ", 1)[0]
        if name in names:
            if line != names[name]:
                raise RuntimeError(f"unexpected xgrammar rule {line!r}: the number bounds need updating for this "
                                   "xgrammar version")
            lines[i] = _BOUNDED_RULES[line]
    text = "\n".join(lines)
    for step in range(1, MAX_AUTOMATON_STEP + 1):
        literal = '"\\"\\\\u0000multipleOf ' + f'{step}\\""'  # how xgrammar writes the placeholder const
        if literal in text:
            text = text.replace(literal, f"multiple_of_{step}") + multiple_of_rules(step)
    return text


def multiple_of_rules(step: int, digits: int = 15) -> str:
    """EBNF rule `multiple_of_{step}`: the integers below 10**digits in magnitude that `step` divides; states
    (remainder, digits written), only those from which a multiple can still be finished."""
    live: dict[tuple[int, int], bool] = {}
    for d in range(digits, 0, -1):
        for r in range(step):
            live[r, d] = r == 0 or d < digits and any(live[(10 * r + c) % step, d + 1] for c in range(10))
    name = f"multiple_of_{step}"
    starts = [f'("{c}" {name}_{c % step}_1)' for c in range(1, 10) if live[c % step, 1]]
    rules = [f'{name} ::= (("0") | ({name}_sign ({" | ".join(starts)})))', f'{name}_sign ::= ("" | ("-"))']
    for (r, d), ok in sorted(live.items()):
        if not ok:
            continue
        alts = ['""'] if r == 0 else []
        if d < digits:
            alts += [f'("{c}" {name}_{(10 * r + c) % step}_{d + 1})' for c in range(10)
                     if live[(10 * r + c) % step, d + 1]]
        rules.append(f"{name}_{r}_{d} ::= ({' | '.join(alts)})")
    return "\n" + "\n".join(rules) + "\n"


def _kinds(node: Mapping[str, Any]) -> set[str]:
    kind = node.get("type")
    return set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def bound_numbers(node: dict[str, Any], path: str, where: str) -> dict[str, Any]:
    """One (copied) schema node rewritten: the missing side of a half-bounded number, multipleOf with a range
    as an enum, a type list holding a bounded number split into anyOf (xgrammar ignores the bounds of a number
    in a type list). Raises ConstraintError for a multipleOf range with too many multiples."""
    kinds = _kinds(node)
    if not kinds & {"number", "integer"} or "enum" in node or "const" in node:
        return node
    low = [node[k] for k in ("minimum", "exclusiveMinimum") if _number(node.get(k))]
    high = [node[k] for k in ("maximum", "exclusiveMaximum") if _number(node.get(k))]
    if len(kinds) > 1 and (low or high or "multipleOf" in node) and not {"anyOf", "oneOf", "allOf"} & set(node):
        rest = {k: v for k, v in node.items() if k != "type"}
        return {"anyOf": [bound_numbers({**rest, "type": t}, f"{path}/type/{t}", where)
                          for t in node["type"]]}
    if "multipleOf" in node and (low or high):
        return {**node, **_multiples(node, path, where)}
    if "multipleOf" in node and kinds == {"integer"} and node["multipleOf"] <= MAX_AUTOMATON_STEP:
        # xgrammar's multipleOf automaton has no digit bound: a placeholder for our bounded one (below)
        return {"const": f"{_MULTIPLE}{node['multipleOf']}"}
    out = dict(node)
    if low and not high:
        out["maximum"] = max(FINITE_BOUND, 10 * abs(max(low))) if max(low) < 1e307 else 1.7976931348623157e308
    elif high and not low:
        out["minimum"] = min(-FINITE_BOUND, -10 * abs(min(high))) if min(high) > -1e307 else -1.7976931348623157e308
    return out


def _multiples(node: Mapping[str, Any], path: str, where: str) -> dict[str, Any]:
    step = node["multipleOf"]
    lo, hi = -FINITE_BOUND, FINITE_BOUND
    if _number(node.get("minimum")):
        lo = max(lo, math.ceil(node["minimum"]))
    if _number(node.get("exclusiveMinimum")):
        lo = max(lo, math.floor(node["exclusiveMinimum"]) + 1)
    if _number(node.get("maximum")):
        hi = min(hi, math.floor(node["maximum"]))
    if _number(node.get("exclusiveMaximum")):
        hi = min(hi, math.ceil(node["exclusiveMaximum"]) - 1)
    first = -(-lo // step) * step  # the smallest multiple >= lo
    count = 0 if hi < first else (hi - first) // step + 1
    if count > MAX_ENUMERATED_MULTIPLES:
        raise ConstraintError(f"{where}: 'multipleOf' {step} with a range at {path} allows {count} values; constrained "
                              f"decoding enumerates at most {MAX_ENUMERATED_MULTIPLES} (the grammar engine cannot "
                              "combine multipleOf with minimum/maximum): narrow the range or drop one of them")
    if count == 0:
        raise ConstraintError(f"{where}: no multiple of {step} lies in the range at {path}")
    return {"enum": list(range(first, hi + 1, step))}
