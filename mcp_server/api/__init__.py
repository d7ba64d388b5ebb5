"""OpenAI- and Anthropic-compatible HTTP API over the same pipeline as the MCP tools (mcp_server/pipeline.py).

app.py: routes, token and Host/Origin checks, /health; openai_chat.py / openai_stream.py: /v1/chat/completions;
completions.py: /v1/completions (with FIM); anthropic_messages.py / anthropic_stream.py: /v1/messages;
requests.py: pydantic request models; errors.py: each API's error shapes; sse.py: the event-stream response.
No conversation state: clients resend the history (which then hits the prefix cache).
"""
