"""Request bodies of the OpenAI and Anthropic routes (pydantic). Field names and shapes follow the official
clients (`openai.types.chat.completion_create_params`, `anthropic.types.message_create_params`). Unknown
top-level keys of chat completions and messages are ignored (clients add new ones often); a Responses body
(`openai.types.responses.response_create_params`) refuses them with a 400 naming the key. Fields we cannot honour
are refused in the route modules with a 400 naming them, never silently dropped."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deepseek_mcp.mcp_server.schemas import OpenAITool, ResponseFormat

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ThinkingSwitch(_Lenient):
    """DeepSeek's `thinking: {"type": "enabled" | "disabled"}` (and Anthropic's, with `budget_tokens`)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # ignored

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    tools: list[OpenAITool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # the thinking switches in use
    thinking: ThinkingSwitch | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking_budget: PositiveInt | None = None
    # OpenAI fields this server does not implement (refused when set)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = None


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class AnthropicTool(_Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search_...) are not ours to run


class AnthropicToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant", "system"]  # system: mid-conversation instructions (Claude Code sends them)
    content: str | list[dict[str, Any]]


class MessagesRequest(_Lenient):
    model: str
    max_tokens: PositiveInt
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingSwitch | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: dict[str, Any] | None = None  # ignored
    stream: bool = False


class CountTokensRequest(_Lenient):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingSwitch | None = None


# -- POST /v1/responses (openai.types.responses.response_create_params) --------------------------------------


class _Closed(BaseModel):
    """Responses bodies: an unknown key is a 400 naming it (the API is new; a silently dropped field would be
    a silent change of meaning)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ReasoningOptions(_Closed):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # the reasoning text itself (see the docs)
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the older spelling of summary


class TextFormat(_Closed):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(_Closed):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted; the model has no such control


class ResponsesStreamOptions(_Closed):
    include_obfuscation: bool | None = None  # accepted; no obfuscation padding is sent


Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs"]


class ResponsesRequest(_Closed):
    model: str
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None  # checked in responses.py (function, custom, hosted)
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextOptions | None = None
    store: bool | None = None  # None: true, as OpenAI
    previous_response_id: str | None = None
    include: list[Includable] | None = None  # accepted; nothing listed is added (see the docs)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    client_metadata: dict[str, Any] | None = None  # accepted, ignored (Codex CLI sends its session ids)
    user: str | None = None  # accepted, ignored
    safety_identifier: str | None = None  # accepted, ignored
    prompt_cache_key: str | None = None  # accepted: the prefix cache needs no key
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None  # accepted, ignored
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None  # accepted, ignored
    truncation: Literal["auto", "disabled"] | None = None  # "auto" is refused in responses.py
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    # OpenAI fields this server does not implement (refused when set)
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    context_management: Any = None
