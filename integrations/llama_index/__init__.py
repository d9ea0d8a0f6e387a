"""LlamaIndex integration: `Settings.llm = ProphetLLM(...)`, a chat LLM that answers retrieved nodes over their KV.

- `ProphetLLM` is a chat model (`is_chat_model=True`): messages are rendered with the model's own chat template,
  system prompt included. Every built-in response synthesizer calls one of its template-level methods (`predict`,
  `stream`, `apredict`, `astream`) with the retrieved text still a separate argument (`context_str`, or
  `context_msg` in refine steps). Those methods render the synthesizer's own template with a mark in place of the
  context (integrations/placement.py), cut it back into the retrieved nodes (integrations/registry.py), and put
  that request in a ContextVar around the normal call path, so every event, callback and template rule upstream
  still runs; `chat` and `stream_chat` then answer it, each node a cached chunk. Any other call (a plain `complete`
  or `chat`, an agent) carries no request and is a plain chat: full prefill, nothing stored.
- `ProphetKVPostprocessor` registers each retrieved node's text, so the LLM finds the nodes in the synthesizer's
  joined context; a node's KV is computed and stored by the first call that uses it (a cache miss, inside that
  call's TTFT). Without it the context is one-off text: no reuse (warned once).
- `ProphetSynthesizer` is the strict mode: one call over exactly the retrieved nodes, one chunk per node.

Errors: the engine's request errors are ValueErrors, and LlamaIndex's refine synthesizers (compact included) turn a
ValueError into "Empty Response"; on the synthesizers' path they are re-raised as `SynthesisError`, which is not one.
Statistics: each ProphetLLM response carries its call's statistics (`RequestStats.to_dict()`: cache hits and
misses, recomputed tokens, TTFT...) in `additional_kwargs["prophet_rag"]` and `raw["prophet_rag"]` (which agents
pass on as `AgentOutput.raw`); a query engine's or chat engine's response lists those of every call it made in
`metadata["prophet_rag"]`.
Token counts: building a ProphetLLM sets `Settings.tokenizer` to the model's tokenizer (`set_global_tokenizer=False`
keeps yours), so LlamaIndex packs contexts by the model's own counts. Leave `context_window` at the model's true
maximum (the default): a smaller one makes compact mode repack the nodes into pieces that match no node.

This module is the public face; the pieces: `llm` (ProphetLLM, SynthesisError), `messages` (LlamaIndex messages and
responses as the engine takes and gives them), `stats` (the statistics scopes of synthesizers and chat engines),
`nodes` (ProphetKVPostprocessor, ProphetSynthesizer).
"""

from prophet_rag.integrations.llama_index.llm import CONTEXT_KEYS, ProphetLLM, SynthesisError
from prophet_rag.integrations.llama_index.nodes import SEPARATOR, ProphetKVPostprocessor, ProphetSynthesizer

__all__ = [
    "CONTEXT_KEYS",
    "SEPARATOR",
    "ProphetKVPostprocessor",
    "ProphetLLM",
    "ProphetSynthesizer",
    "SynthesisError",
]
