"""Does computing each passage behind the prompt's own prefix bring the stitched cache closer to full prefill?
(issue 24, seventh run)

The engine computes every chunk behind one sink token (`PromptBuilder.sink_ids`: BOS, or for Qwen2.5
`<|endoftext|>`). This runs `prophet-rag`'s command with the sink patched to the default request's prefix (chat
template start, system prompt, instruction), CacheBlend's way of prefilling its passages: the first passage's KV is
then exactly full prefill's, and every other passage is computed as it would be seen first after the instruction.

    python sink_prefix.py bench --dataset musique musique_s.json --model QWEN_DIR --max-new-tokens 12 --no-plot \\
        --ratios 0.2 --methods full,reuse,prophet,cacheblend,prophet_focus --store S --first-case 0 --cases 10 --out OUT

Stored entries are keyed by their sink ids, so a store written with the patch never serves an engine without it.
"""

from __future__ import annotations

import sys

import prophet_rag.layout as layout
from prophet_rag.cli import main


def prefix_sink(self: layout.PromptBuilder):
    """`[s]` the default request's prefix, whatever the query (it sits after the documents)."""
    return self.layout(["x"], "q").prefix_ids


if __name__ == "__main__":
    layout.PromptBuilder.sink_ids = prefix_sink
    sys.exit(main(sys.argv[1:]))
