"""Pydantic models at the MCP boundary: what each tool accepts and returns.

The JSON Schemas the agent sees are generated from these classes, so field descriptions are written for the agent.
Inputs reject unknown keys (a misspelled `max_token` is an error, not a silent default).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "time", "cancelled"]
ToolChoiceMode = Literal["auto", "required", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- inputs


class ToolCallIn(_Strict):
    """A tool call the assistant made earlier in the conversation (ours or OpenAI-style)."""

    id: str | None = Field(None, description="Call id, echoed by the matching role 'tool' message.")
    name: str = Field(description="Name of the tool that was called.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Arguments of the call (a JSON object).")

    @model_validator(mode="before")
    @classmethod
    def _flatten_openai(cls, data: Any) -> Any:
        # OpenAI: {"id", "type": "function", "function": {"name", "arguments": "<json>"}}
        if isinstance(data, dict) and isinstance(data.get("function"), dict):
            fn = data["function"]
            rest = {k: v for k, v in data.items() if k not in ("function", "type")}
            return {**rest, "name": fn.get("name"), "arguments": fn.get("arguments", {})}
        return data

    @field_validator("arguments", mode="before")
    @classmethod
    def _parse_arguments(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"arguments is a string but not valid JSON ({e.msg}); pass a JSON object") from None
        return value


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class Message(_Strict):
    """One chat message. `content` may be null only on an assistant message that carries `tool_calls`."""

    role: Role
    content: str | list[TextPart] | None = Field(None, description="Text, or [{type: 'text', text}].")
    tool_calls: list[ToolCallIn] | None = Field(None, description="Role assistant only: [{id, name, arguments}].")
    tool_call_id: str | None = Field(None, description="Role tool only: the call answered.")
    name: str | None = None  # the tool's name on a role 'tool' message

    @model_validator(mode="after")
    def _check_shape(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on role 'assistant' messages, not '{self.role}'")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required on a message with role '{self.role}'")
        return self


class GenerationInput(_Strict):
    """Inputs shared by chat, think and tool_call. Give exactly one of `prompt` or `messages`."""

    prompt: str | None = Field(None, description="One user message (or give messages).")
    messages: list[Message] | None = Field(None, description="[{role: system|user|assistant|tool, content, "
                                           "tool_calls?, tool_call_id?}], ending with the turn to answer.")
    system: str | None = Field(None, description="System prompt (replaces a continued conversation's).")
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(None, description="0 = greedy.")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: list[str] | None = Field(None, max_length=16)
    conversation_id: str | None = Field(None, description="From a result: continue that conversation.")


class JsonSchemaSpec(_Strict):
    """OpenAI's nesting: {"name", "schema", "strict"?, "description"?}."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    """{"type": "json_schema", "schema": {...}}, OpenAI's {"type": "json_schema", "json_schema": {"name",
    "schema"}}, {"type": "json_object"} (any JSON object) or {"type": "text"} (no constraint)."""

    type: Literal["json_schema", "json_object", "text"]
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema (type json_schema).")
    json_schema: JsonSchemaSpec | None = Field(None, description="OpenAI-style holder of the schema.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check_shape(self) -> ResponseFormat:
        given = (self.schema_ is not None) + (self.json_schema is not None)
        if self.type == "json_schema" and given != 1:
            raise ValueError("response_format type 'json_schema' needs exactly one of `schema` (the JSON Schema) "
                             "or `json_schema` ({name, schema})")
        if self.type != "json_schema" and given:
            raise ValueError(f"response_format type {self.type!r} takes no schema; use type 'json_schema'")
        return self

    def schema_or_none(self) -> dict[str, Any] | None:
        if self.json_schema is not None:
            return self.json_schema.schema_
        return self.schema_

    def as_request(self) -> dict[str, Any]:
        """The shape inference.constrained.factory expects."""
        schema = self.schema_or_none()
        return {"type": self.type} if schema is None else {"type": self.type, "schema": schema}


class ChatInput(GenerationInput):
    response_format: ResponseFormat | None = Field(
        None, description="{type: 'json_schema', schema} or {type: 'json_object'}: JSON output, in `parsed`."
    )


class ThinkInput(ChatInput):
    thinking_budget: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Most reasoning tokens, then the answer follows; below max_tokens."
    )


class FunctionSpec(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class OpenAITool(_Strict):
    """OpenAI-style tool: {type: "function", function: {name, description, parameters}}."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class McpTool(BaseModel):
    """MCP-style tool, as listed by tools/list: {name, description, inputSchema}. Other fields are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}}, alias="inputSchema"
    )

    @model_validator(mode="before")
    @classmethod
    def _schema_aliases(cls, data: Any) -> Any:
        # Also accept the plain {name, description, parameters} and Anthropic's `input_schema` spellings.
        if isinstance(data, dict) and "inputSchema" not in data:
            for key in ("input_schema", "parameters"):
                if key in data:
                    return {**{k: v for k, v in data.items() if k != key}, "inputSchema": data[key]}
        return data


class NamedToolChoice(_Strict):
    """Force a call to one tool: {"name": "..."} (OpenAI's {"type": "function", "function": {"name"}} works)."""

    name: str

    @model_validator(mode="before")
    @classmethod
    def _flatten_openai(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("function"), dict):
            return {"name": data["function"].get("name")}
        return data


class ToolCallInput(GenerationInput):
    tools: list[McpTool | OpenAITool] = Field(
        min_length=1, description="MCP {name, description, inputSchema} or OpenAI {type: 'function', function}."
    )
    tool_choice: ToolChoiceMode | NamedToolChoice = Field("auto", description="auto | required | none | {name}")


class ResetInput(_Strict):
    conversation_id: str


class ListModelsInput(_Strict):
    pass


# ---------------------------------------------------------------------------------------------- outputs


class SpeculativeUsage(BaseModel):
    draft_tokens: int = Field(description="Draft tokens the model verified.")
    accepted_tokens: int = Field(description="Of them, accepted (emitted without a step of their own).")
    acceptance_rate: float
    mean_accepted_length: float = Field(description="Tokens emitted per verifying step (accepted drafts + 1).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: SpeculativeUsage | None = Field(
        None, description="Speculative decoding (--speculative-tokens), where the server runs it.",
        exclude_if=lambda v: v is None)  # absent, not null, without speculative decoding


class GenerationOutput(BaseModel):
    """Fields every generating tool returns."""

    text: str
    finish_reason: FinishReason = Field(description="time: the time limit (from admission).")
    usage: Usage
    conversation_id: str  # pass back to continue
    model: str
    steered: bool = Field(False, description="Output steered short by a low token budget.")


class ChatOutput(GenerationOutput):
    parsed: Any = Field(None, description="response_format: the JSON reply (null: see parse_error).")
    parse_error: str | None = Field(None, description="Why the reply is not JSON of the schema.")


class ThinkOutput(ChatOutput):
    reasoning: str = Field(description="Between <think> and </think>.")
    answer: str = Field(description="Same as text.")
    reasoning_tokens: int = Field(description="Reasoning tokens, not counting </think>.")
    reasoning_complete: bool = Field(description="False if cut before </think>.")


class ToolCallOut(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any]


class InvalidToolCall(BaseModel):
    name: str | None = Field(description="Tool name the model wrote, if any.")
    raw: str = Field(description="The call as generated.")
    error: str = Field(description="Why the call is unusable (unknown tool, bad JSON, schema mismatch).")


class ToolCallOutput(GenerationOutput):
    tool_calls: list[ToolCallOut] = Field(description="Arguments checked against the tool's schema.")
    invalid_tool_calls: list[InvalidToolCall] = Field(description="Unusable calls, with the reason.")


class Architecture(BaseModel):
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    q_lora_rank: int | None
    kv_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int


class ModelInfo(BaseModel):
    model: str = Field(description="Name reported in every result's `model` field.")
    source: str = Field(description="Checkpoint path or Hugging Face id; 'demo' for the built-in demo.")
    demo: bool = Field(description="True when serving the demo checkpoint (random weights, meaningless text).")
    status: Literal["loading", "ready", "failed"]
    error: str | None = None
    load_seconds: float | None = None
    architecture: Architecture | None = None
    parameters: int | None = None
    weight_bytes: int | None = Field(None, description="Memory the weights take as laid out for the step (FP8 kept "
                                     "or dequantized, W_UK / W_UV dense, fused projections); on rank 0 under tensor "
                                     "parallelism.")
    dtype: str | None = None
    device: str | None = None
    kernels: str | None = Field(None, description="Which kernels run: triton or torch.")
    context_tokens: int | None = Field(None, description="Longest prompt + max_tokens one call can use.")
    context_limit: str | None = Field(None, description="What sets context_tokens (the KV cache or the model).")
    cache_capacity_tokens: int | None = None
    defaults: dict[str, Any] = Field(default_factory=dict, description="Defaults applied to omitted inputs.")
    stats: dict[str, Any] = Field(default_factory=dict, description="Serving engine statistics.")


class ListModelsOutput(BaseModel):
    models: list[ModelInfo]


class ResetOutput(BaseModel):
    conversation_id: str
    removed_messages: int
