"""The model-side compute path: everything that runs the model's layers.

Owns the model adapter (`model_adapter`: one interface over Llama, Mistral, Qwen2 and Qwen3 checkpoints), a chunk's
isolated KV (`chunk_kv.ChunkKV`, what isolated prefill computes and the cache stores), prefill (`prefill`: full and
isolated), the stitched cache and the selective forward (`stitched`: re-positioning, `forward_rows`), ProphetKV's
Stage I scoring over a stitched cache (`scoring`), decoding (`generate`: the one place a token is chosen),
continuous batching (`batch`: N requests' decode steps and prefill passes as one forward; `batcher`: admission
and the thread that runs those steps under the compute lock, `lock`) and graph-captured few-row passes
(`cuda_graphs`, GPU only).

May import `prophet_rag.kernels` and the base modules (`config`, `errors`); never the cache, the selection methods,
the engine or anything above them.
"""
