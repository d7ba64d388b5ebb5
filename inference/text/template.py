"""DeepSeek-V3.1 chat template, rendered in plain Python.

`render_prompt` reproduces the official `chat_template` of the DeepSeek-V3.1 tokenizer configuration byte for
byte (as transformers renders it: jinja2 with trim_blocks, lstrip_blocks) for every input that template
accepts, including its quirks:
- all system messages, wherever they stand, are joined with a blank line right after BOS;
- an assistant turn right after a user turn opens with `<｜Assistant｜></think>`; one that follows a tool
  result (or another assistant turn) gets no `<｜Assistant｜>` at all, and its content is written verbatim;
- earlier reasoning is cut at the first `</think>` (only for plain assistant turns not after a tool result);
- tool-call turns write their content (if any) before the first call, calls chained with no separator;
- a `prefix` assistant turn in thinking mode opens with `<think>` instead of `</think>` (content still cut
  at `</think>`, and `<｜end▁of▁sentence｜>` still appended);
- the generation prompt is added only after a user turn: never after a tool result or an assistant turn.

Where the official template crashes or renders nonsense, we do what the caller meant (documented divergences):
- content null (or missing on an assistant turn) renders as "" (the template raises on `None + str`);
- tool-call arguments given as an object are written once as compact JSON (the template raises on
  `str + dict`); a string is written untouched, never re-encoded;
- `tool_calls: []` is a plain assistant turn (the template writes a lone `<｜tool▁calls▁end｜>` and drops the
  content);
- OpenAI content parts (`[{"type": "text", "text": ...}]`) are joined into one string.

The official template has no tools; `tools` renders the model card's `## Tools` block after the system prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepseek_mcp.inference.text.control import (
    ASSISTANT,
    BOS,
    EOS,
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_SEP,
    USER,
)
from deepseek_mcp.inference.text.segments import Parts, Segment, TokenEncoder, encode_segments
from deepseek_mcp.inference.text.tools import normalize_tools

if TYPE_CHECKING:
    from deepseek_mcp.inference.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# The model card's tool description, after the per-tool sections. Text as printed on the card (note "Where:" is
# followed directly by the list, and `{{additional_tool_calls}}` is literal). The card prints it as a fenced
# block, whose content ends with a newline; vLLM's, SGLang's and rtp-llm's V3.1 templates also end it with one.
TOOL_FORMAT_RULES = (
    "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
    "{{additional_tool_calls}}" f"{TOOL_CALLS_END}\n"
    "\n"
    "Where:\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, chain them directly without separators or spaces\n"
)


@dataclass(frozen=True)
class ToolCallRecord:
    """A tool call in the history: name and the exact argument text written into the prompt."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One validated message. `content` is always a string; `tool_calls` is None or non-empty."""

    role: str
    content: str
    tool_calls: tuple[ToolCallRecord, ...] | None = None
    prefix: bool = False


# ---------------------------------------------------------------------------------------------------------
# Validation


def _content(index: int, role: str, msg: Mapping[str, Any]) -> str:
    if "content" not in msg and role != "assistant":
        raise ValueError(f"messages[{index}] ({role}): missing 'content'; give a string (or null for empty)")
    value = msg.get("content")
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        texts: list[str] = []
        for j, part in enumerate(value):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"messages[{index}] ({role}): content[{j}] is not a text part; only "
                    "{'type': 'text', 'text': str} parts are supported"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(
        f"messages[{index}] ({role}): content must be a string, null or a list of text parts, "
        f"got {type(value).__name__}"
    )


def _tool_call(index: int, j: int, call: Any) -> ToolCallRecord:
    where = f"messages[{index}].tool_calls[{j}]"
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(call).__name__}")
    fn = call["function"] if "function" in call else call
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where}: 'function' must be an object with 'name' and 'arguments'")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: missing tool name; give 'function': {{'name': str, 'arguments': ...}} "
                         "or a flat {'name': str, 'arguments': ...}")
    if "arguments" not in fn or fn["arguments"] is None:
        raise ValueError(f"{where} ({name}): missing 'arguments'; give a JSON string or an object")
    args = fn["arguments"]
    if isinstance(args, str):
        return ToolCallRecord(name, args)  # already JSON text: written untouched
    if isinstance(args, Mapping):
        try:
            text = json.dumps(dict(args), ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} ({name}): arguments are not JSON-serializable: {e}") from e
        return ToolCallRecord(name, text)
    raise ValueError(f"{where} ({name}): arguments must be a JSON string or an object, got {type(args).__name__}")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Validate chat messages (OpenAI-style dicts) into `Message`s. Raises ValueError naming the bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content', got "
                             f"{type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = _content(i, role, msg)
        calls = msg.get("tool_calls") if role == "assistant" else None
        records: tuple[ToolCallRecord, ...] | None = None
        if calls is not None:
            if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
                raise ValueError(f"messages[{i}] (assistant): tool_calls must be a list, got {type(calls).__name__}")
            records = tuple(_tool_call(i, j, c) for j, c in enumerate(calls)) or None
        out.append(Message(role, content, records, bool(msg.get("prefix")) if role == "assistant" else False))
    return out


# ---------------------------------------------------------------------------------------------------------
# Rendering


def render_tools(tools: Sequence[Any]) -> str:
    """The model card's `## Tools` block; `Parameters:` is `json.dumps(parameters)` with Python's defaults."""
    return "".join(s for s, _ in _tools_segments(tools))


def _tools_segments(tools: Sequence[Any]) -> list[Segment]:
    parts = Parts()
    parts.text("## Tools\nYou have access to the following tools:\n\n")
    for spec in normalize_tools(tools):
        try:
            params = json.dumps(dict(spec.parameters))
        except (TypeError, ValueError) as e:
            raise ValueError(f"tool {spec.name!r}: parameters are not JSON-serializable: {e}") from e
        parts.text(f"### {spec.name}\nDescription: {spec.description}\n\nParameters: {params}\n\n")
    parts.template(TOOL_FORMAT_RULES)
    return parts.segments


def _drop_reasoning(content: str) -> str:
    # Earlier turns keep only what follows the first </think> (the template's `content.split('</think>', 1)[1]`).
    head, sep, tail = content.partition(THINK_END)
    return tail if sep else head


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Any] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Render a conversation as DeepSeek-V3.1 prompt text (starts with BOS).

    `continue_final_message`: the last message must be an assistant turn; its closing `<｜end▁of▁sentence｜>`
    is dropped so generation continues it (what transformers' flag of that name does; used with `prefix`).
    """
    return "".join(s for s, _ in render_segments(messages, tools=tools, thinking=thinking,
                                                 add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message))


def render_segments(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Any] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[Segment]:
    """`render_prompt` as (text, is_control) segments: the template's structure is control, every string the
    caller sent is text (see segments.py)."""
    msgs = normalize_messages(messages)
    system = "\n\n".join(m.content for m in msgs if m.role == "system")
    out = Parts()
    out.control(BOS)
    out.text(system)
    if tools:
        # The card writes `{system prompt}{tool_description}`. With a system prompt we separate them by a blank
        # line, as vLLM's, SGLang's and rtp-llm's V3.1 tool templates do and as the template itself joins
        # system messages; without one the block follows BOS directly (no leading blank line).
        out.text("\n\n" if system else "")
        out.extend(_tools_segments(tools))
    is_last_user = False  # the template's ns.is_last_user / ns.is_tool
    is_tool = False
    for m in msgs:
        if m.role == "user":
            is_tool, is_last_user = False, True
            out.control(USER)
            out.text(m.content)
        elif m.role == "assistant" and m.tool_calls is not None:
            if is_last_user:
                out.control(ASSISTANT + THINK_END)
            is_last_user, is_tool = False, False
            out.text(m.content)  # content (not cut at </think>) before the first call
            out.control(TOOL_CALLS_BEGIN)
            for c in m.tool_calls:
                out.control(TOOL_CALL_BEGIN)
                out.text(c.name)
                out.control(TOOL_SEP)
                out.text(c.arguments)
                out.control(TOOL_CALL_END)
            out.control(TOOL_CALLS_END + EOS)
        elif m.role == "assistant":
            if is_last_user:
                out.control(ASSISTANT + (THINK_BEGIN if m.prefix and thinking else THINK_END))
            is_last_user = False
            if is_tool:  # the answer after tool results: verbatim, no </think> cut
                is_tool = False
                out.text(m.content)
            else:
                out.text(_drop_reasoning(m.content))
            out.control(EOS)
        elif m.role == "tool":
            is_last_user, is_tool = False, True
            out.control(TOOL_OUTPUT_BEGIN)
            out.text(m.content)
            out.control(TOOL_OUTPUT_END)
    if continue_final_message:
        if not msgs or msgs[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be an assistant turn")
        out.drop_last(EOS)
    elif add_generation_prompt and is_last_user and not is_tool:
        out.control(ASSISTANT + (THINK_BEGIN if thinking else THINK_END))
    return out.segments


def render_ids(messages: Sequence[Mapping[str, Any]], tokenizer: TokenEncoder, *,
               trusted_control_tokens: bool = False, max_tokens: int | None = None, **kwargs: Any) -> list[int]:
    """The prompt's ids, exactly the BOS the template writes (encode adds none).

    The template's structure becomes control tokens; message content, tool results, tool-call names and
    arguments and the tools block are plain text, so content that spells a control token is those characters,
    never the token. `trusted_control_tokens=True`: `tokenizer.encode(render_prompt(...))`, as the official
    template with the tokenizer does, for callers whose every message is trusted. `max_tokens`: PromptTooLong
    (a ValueError) as soon as the prompt is certainly longer, without encoding the rest (segments.py).
    """
    return encode_segments(render_segments(messages, **kwargs), tokenizer, trusted=trusted_control_tokens,
                           max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------------------
# Template selection


class ChatTemplate:
    """How prompts are rendered: our Python renderer (default) or a checkpoint's own jinja `chat_template`.

    The jinja path runs in jinja2's ImmutableSandboxedEnvironment with transformers' settings (trim_blocks,
    lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`) and passes messages
    through as given: the checkpoint's template decides what it accepts.
    """

    def __init__(self, jinja_source: str | None = None, *, bos_token: str = BOS, eos_token: str = EOS) -> None:
        self.source = jinja_source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = _compile_jinja(jinja_source) if jinja_source is not None else None

    @property
    def kind(self) -> str:
        return "python" if self._compiled is None else "jinja"

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, use_checkpoint_template: bool = False) -> ChatTemplate:
        """Our renderer unless `use_checkpoint_template`; then the `chat_template` of the checkpoint's
        tokenizer_config.json (or its chat_template.jinja), with that config's BOS/EOS strings."""
        if not use_checkpoint_template:
            return cls()
        if path is None:
            raise ValueError("use_checkpoint_template needs a checkpoint path")
        folder = Path(path).expanduser()
        folder = folder.parent if folder.is_file() else folder
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {config_file}: {e}") from e
        source = config.get("chat_template")
        if isinstance(source, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            source = next((t.get("template") for t in source if isinstance(t, Mapping)
                           and t.get("name") == "default"), None)
        if not isinstance(source, str) and (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(source, str):
            raise ValueError(f"no chat_template in {config_file} or {folder / 'chat_template.jinja'}; "
                             "drop use_checkpoint_template to use the built-in DeepSeek-V3.1 renderer")
        return cls(source, bos_token=_token_text(config.get("bos_token"), BOS),
                   eos_token=_token_text(config.get("eos_token"), EOS))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        if self._compiled is None:
            return render_prompt(messages, tools=tools, thinking=thinking,
                                 add_generation_prompt=add_generation_prompt)
        import jinja2

        openai_tools = None
        if tools:
            openai_tools = [{"type": "function", "function": {"name": s.name, "description": s.description,
                                                              "parameters": s.parameters}}
                            for s in normalize_tools(tools)]
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages], tools=openai_tools, thinking=thinking,
                add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"the checkpoint's chat template failed on these messages: {e}") from e

    def render_ids(self, messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                   trusted_control_tokens: bool = False, **kwargs: Any) -> list[int]:
        """Our renderer: `render_ids` (content is text). A checkpoint's jinja template renders one string, whose
        structure cannot be told from content, so unless `trusted_control_tokens` a message or tool that spells
        an added token is refused (ValueError) rather than encoded as that token."""
        if self._compiled is None:
            return render_ids(messages, tokenizer, trusted_control_tokens=trusted_control_tokens, **kwargs)
        if not trusted_control_tokens:
            _refuse_spelled_tokens({"messages": list(messages), "tools": list(kwargs.get("tools") or [])}, tokenizer)
        text = self.render(messages, **kwargs)
        ids = list(tokenizer.encode(text))
        if text.startswith(self.bos_token) and (not ids or ids[0] != tokenizer.bos_id):
            raise RuntimeError(f"rendered prompt does not start with BOS id {tokenizer.bos_id}")
        return ids


def _refuse_spelled_tokens(value: Any, tokenizer: Tokenizer, where: str = "") -> None:
    if isinstance(value, str):
        spelled = tokenizer.special_token_ids.intersection(tokenizer.encode(value))
        if spelled:
            token = tokenizer.decode([min(spelled)])
            raise ValueError(f"{where.lstrip('.')}: the text spells the control token {token!r}; the checkpoint's "
                             "chat template cannot keep it as text. Remove it, use the built-in renderer, or "
                             "render with trusted_control_tokens for trusted input")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _refuse_spelled_tokens(v, tokenizer, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_spelled_tokens(v, tokenizer, f"{where}[{i}]")
    elif hasattr(value, "model_dump"):
        _refuse_spelled_tokens(value.model_dump(by_alias=True, exclude_none=True), tokenizer, where)


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _compile_jinja(source: str) -> Any:
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from e
