"""Structured answers: constrained decoding (`grammar`), tools and their call formats per model family (`tools`,
`formats`), streaming call parsing (`stream`) and chat rendering that keeps untrusted text out of template structure
(`render`)."""

from prophet_rag.structured.formats import FAMILIES, ToolFormat, detect_family, tool_format
from prophet_rag.structured.grammar import Grammar, GrammarCache, GrammarViolationError, TokenConstraint
from prophet_rag.structured.tools import InvalidToolCall, ParsedOutput, Tool, ToolCall, as_tools, tool_choice

__all__ = [
    "FAMILIES",
    "Grammar",
    "GrammarCache",
    "GrammarViolationError",
    "InvalidToolCall",
    "ParsedOutput",
    "TokenConstraint",
    "Tool",
    "ToolCall",
    "ToolFormat",
    "as_tools",
    "detect_family",
    "tool_choice",
    "tool_format",
]
