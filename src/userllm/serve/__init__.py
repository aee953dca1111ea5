"""``userllm serve``: an OpenAI-compatible personalized chat API over an event store."""
