"""`prophet-rag serve`: an OpenAI-compatible chat-completions server over one engine.

`config` (limits, queueing, the API key), `scheduler` (the bounded queue and the engine's worker threads),
`openai_api` (the wire format: bodies in, JSON and SSE chunks out), `metrics` (Prometheus), `app` (the FastAPI
routes) and `cli` (the command). Needs the `serve` extra: `pip install 'prophet-rag[serve]'`.
"""
