"""Chunk KV tiers and the chunk cache over them.

Owns the tier protocol and `ChunkRef` (`tier`), the chunk cache that walks the tiers and computes a miss
(`chunk_cache`), the in-memory tiers (`hot_cache`: device and pinned host memory), the disk store (`store`, over its
diskcache index `store_db`, entry reading `store_entry`, value files `store_files` and its upkeep `store_upkeep`:
verify, orphans, eviction, index repair), the entry format and its tags (`codec`), content keys and fingerprints
(`keys`), the shared Redis/Valkey tier (`remote`, with `remote_guard`: its per-request time budget and circuit
breaker) and the conversation prefix cache (`prefix_cache`: finished requests' KV by token ids, not a chunk tier).

May import `prophet_rag.compute` (the KV it stores and the stitched cache it fills) and the base modules (`layout`,
`config`, `errors`); never the selection methods, the engine or anything above them.
"""
