"""Spike (issue 22): the langchain-tests tool-calling and structured-output prompts, rendered with the model's own
tool format (`structured.render`) and decoded greedily under the `tool_choice` grammar, to see which tests a model
can pass once the feature flags are on.

    python benchmarks/spike_tool_calls.py                                   # embedded SmolLM2-135M
    python benchmarks/spike_tool_calls.py --model "$(/work/shared/tools/build-qwen05 .venv/bin/python)"

Each case is the suite's prompt, tools (converted by langchain_core's `convert_to_openai_tool`, as `bind_tools`
will) and tool_choice (`any` is the suite's choice when the model declares tool_choice; `auto` when it does not),
and the suite's assertion on the resulting calls. One call per answer unless `--parallel` (both models repeat the
same call block after block when allowed several).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from prophet_rag import ProphetEngine, StoreConfig
from prophet_rag.compute.generate import decode_one, sample
from prophet_rag.config import GenerationConfig
from prophet_rag.prefill import prefill_full
from prophet_rag.structured import Grammar, TokenConstraint, as_tools, tool_format
from prophet_rag.structured.render import Piece, render


class _MagicInput(BaseModel):
    input: int = Field(..., gt=-1000, lt=1000)


@tool(args_schema=_MagicInput)
def magic_function(_input: int) -> int:
    """Apply a magic function to an input."""
    return _input + 2


@tool
def magic_function_no_args() -> int:
    """Calculate a magic function."""
    return 5


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny."


@tool
def greeting_generator(answer_style: str) -> str:
    """Generate a greeting in a particular style of speaking."""
    return "hello"


@tool
def unicode_customer(customer_name: str, description: str) -> str:
    """Tool for creating a customer with Unicode name.

    Args:
        customer_name: The customer's name in their native language.
        description: Description of the customer.
    """
    return customer_name


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


def one_call(name, args=None, check=None):
    def ok(parsed):
        if len(parsed.tool_calls) != 1 or parsed.invalid_tool_calls or parsed.tool_calls[0].name != name:
            return False
        call = parsed.tool_calls[0]
        return (args is None or call.arguments == args) and (check is None or check(call.arguments))
    return ok


CASES = [
    ("test_tool_calling (any)", [magic_function], "any", "What is the value of magic_function(3)? Use the tool.",
     one_call("magic_function", {"input": 3})),
    ("test_tool_calling (auto)", [magic_function], "auto", "What is the value of magic_function(3)? Use the tool.",
     one_call("magic_function", {"input": 3})),
    ("test_tool_calling_with_no_arguments (any)", [magic_function_no_args], "any",
     "What is the value of magic_function_no_args()? Use the tool.", one_call("magic_function_no_args", {})),
    ("test_bind_runnables_as_tools (any)", [greeting_generator], "any", "Using the tool, generate a Pirate greeting.",
     one_call("greeting_generator", check=lambda a: bool(a.get("answer_style")))),
    ("test_tool_choice (any)", [magic_function, get_weather], "any", "Hello!", lambda p: bool(p.tool_calls)),
    ("test_tool_choice (magic_function)", [magic_function, get_weather], "magic_function", "Hello!",
     lambda p: bool(p.tool_calls) and p.tool_calls[0].name == "magic_function"),
    ("test_agent_loop, first turn (auto)", [get_weather], "auto", "What is the weather in San Francisco, CA?",
     one_call("get_weather")),
    ("test_unicode_tool_call_integration, zh (any)", [unicode_customer], "any",
     "Create a customer named '你好啊集团' (Hello Group) - a Chinese technology company",
     one_call("unicode_customer", check=lambda a: any(c in a.get("customer_name", "") for c in "你好"))),
    ("test_unicode_tool_call_integration, ja (any)", [unicode_customer], "any",
     "Create a customer named 'こんにちは株式会社' (Hello Corporation) - a Japanese company",
     one_call("unicode_customer", check=lambda a: any(c in a.get("customer_name", "") for c in "こん株式会社"))),
]


def generate(engine, messages, tools, grammar, max_new):
    tok = engine.tokenizer
    fmt = tool_format(tok)
    ids = []
    for piece in render(tok, messages, tools, fmt):
        assert isinstance(piece, Piece)
        ids += tok(piece.text, add_special_tokens=False, split_special_tokens=not piece.trusted)["input_ids"]
    ids = torch.tensor(ids)
    eos = engine._default_eos()
    vocab = int(engine.adapter.model.config.vocab_size)
    constraint = TokenConstraint.build(grammar, tok, vocab, eos)
    with torch.inference_mode():
        cache, hidden = prefill_full(engine.adapter, ids, 0, len(ids) + max_new + 1, engine.kv_dtype)
        logits = engine.adapter.logits(hidden[-1:])[0]
        out = []
        for _ in range(max_new):
            token = sample(constraint.mask(logits), GenerationConfig(), None)
            if token in eos:
                break
            constraint.advance(token)
            out.append(token)
            logits = decode_one(engine.adapter, cache, token)
    return tok.decode(out, skip_special_tokens=False), fmt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=int, default=len(CASES))
    parser.add_argument("--parallel", action="store_true",
                        help="allow several calls per answer (default: one, parallel_tool_calls=False)")
    parser.add_argument("--max-string-chars", type=int, default=160, help="bound on the joke's strings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = ProphetEngine.from_pretrained(args.model, store=StoreConfig(directory=tempfile.mkdtemp()))
    print(f"{engine.model_name}: family {tool_format(engine.tokenizer).family}, "
          f"{'parallel calls' if args.parallel else 'one call per answer'}\n")
    print("| langchain-tests case | passes | output |\n|---|---|---|")
    for name, lc_tools, choice, prompt, check in CASES[: args.limit]:
        tools = as_tools([convert_to_openai_tool(t) for t in lc_tools])
        fmt = tool_format(engine.tokenizer)
        fmt = fmt if args.parallel else replace(fmt, parallel=False)
        grammar = fmt.grammar(tools, {"any": "required"}.get(choice, choice))
        t0 = time.perf_counter()
        text, fmt = generate(engine, [{"role": "user", "content": prompt}], tools, grammar, args.max_new_tokens)
        parsed = fmt.parse(text, tools)
        print(f"| {name} | {'yes' if check(parsed) else 'no'} | `{text!r}` ({time.perf_counter() - t0:.0f} s) |")
    schema = Joke.model_json_schema()
    text, _ = generate(engine, [{"role": "user", "content": "Tell me a joke about cats."}], (),
                       Grammar.json_schema(schema, max_string_chars=args.max_string_chars), args.max_new_tokens)
    try:
        Joke.model_validate(json.loads(text))
        ok = "yes"
    except ValueError:
        ok = "no"
    print(f"| test_structured_output (json_schema, strings <= {args.max_string_chars} chars) | {ok} | `{text!r}` |")


if __name__ == "__main__":
    main()
