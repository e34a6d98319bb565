"""The inference path: a wire request (OpenAI or Anthropic) to an engine and back.

``dispatch`` is the one place that resolves the model, checks limits, forwards to an upstream
or generates, and renders the answer; the realtime routes (``batchd.api``) and the batch
executors (``executors``) both call it, so the two surfaces cannot drift apart.
"""
