"""The providers: OpenAI (Responses and Chat Completions), Anthropic (Messages) and the
OpenAI-compatible providers by name. ``polos._private.agents.provider`` is the loop's door."""
