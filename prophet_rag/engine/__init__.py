"""The engine: answer a question over retrieved documents, reusing each document's cached KV.

A request runs as a pipeline: lay out `prefix | chunks | suffix` (layout.py); get every segment's KV from the
chunk cache, computing what no tier holds (cache/chunk_cache.py); let the selection method order the chunks and
stitch their blocks behind the exact prefix, re-rotated to their global positions (compute/stitched.py); let the
method pick the context tokens to recompute (selection/); recompute them with the suffix (stitched.forward_rows);
decode with the other running requests (compute/batcher.py). A method that reuses no cached KV (`full`) is plain
full prefill over the same ids. With a prefix cache (cache/prefix_cache.py), a finished request's KV is kept, and a
later request starting with the same tokens (the next turn of a conversation) copies it in and computes only what
follows.

One engine serves many threads: requests are laid out, checked and detokenized concurrently, and their model
computation (each prefill's assembly, each batched step, each chunk ingested) runs one at a time under the engine's
compute lock (compute/lock.py), first come first served. Up to `BatchConfig.max_batch` requests hold a place at once;
each is prefilled on its caller's thread, its forward passes run in the batcher's steps with those of the requests
prefilling at the same time (`BatchConfig.batch_prefills`), then decoded together with the others, one forward pass
per step for all of them (continuous batching), its tokens handed to its thread through a queue, so a slow or
abandoned consumer blocks nobody.

Modules: `prophet_engine` (`ProphetEngine`, `AnswerStream`: the public calls, request checks, decoding and the
`Answer`), `pipeline` (`Prefiller`: a request's prefill up to its first token's logits) and `loading` (finding and
loading a model for `ProphetEngine.from_pretrained`, failing fast with the fix).
"""

from prophet_rag.engine.prophet_engine import AnswerStream, ProphetEngine

__all__ = ["AnswerStream", "ProphetEngine"]
