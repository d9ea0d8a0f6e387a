"""Which context tokens to recompute: the selection methods' plans, orderings and signals.

Each method is declared once in `prophet_rag.methods` (its name, flags and where its plan and ordering live); its
code lives here: `request` (a request as the methods see it, its derived signals computed once, and the plan they
return), `signals` (lexical and anchored relevance), `baselines` (reuse, random, EPIC, CacheBlend), `prophet`
(ProphetKV, InfoFlow and prophet_plus) and `prophet_focus` (ours).

May import `prophet_rag.compute` (the stitched cache, the model adapter, Stage I scoring) and the base modules
(`methods`, `config`, `errors`); never the cache, the engine or anything above them.
"""
