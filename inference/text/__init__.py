"""Text: tokenizer, the DeepSeek-V3.1 chat template, the streamed output parser."""
