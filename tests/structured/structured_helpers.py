"""Tokenizers for the structured-output tests: the tiny ChatML tokenizer, alone or with another family's chat
template (tests/structured/templates) and that family's special tokens added."""

from __future__ import annotations

import copy
from pathlib import Path

from tiny import tiny_tokenizer

TEMPLATES = Path(__file__).parent / "templates"
PLAIN_ADDED = {"qwen2.5": ["<tool_call>", "</tool_call>"]}
"""Added tokens that are not special (Qwen2.5's tool tags are single tokens that decode as text)."""
SPECIALS = {
    "qwen2.5": ["<|endoftext|>"],
    "llama3.1_json": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
    "mistral_official": ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                         "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
}


def family_tokenizer(template: str | None):
    """The tiny tokenizer with `template` (a file stem in templates/, or None for its own ChatML template)."""
    tokenizer = copy.deepcopy(tiny_tokenizer())
    if template is not None:
        tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[template]})
        tokenizer.add_tokens(PLAIN_ADDED.get(template, []), special_tokens=False)
    return tokenizer
