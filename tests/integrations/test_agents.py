"""Agents over a folder of documents (tiny random model, offline), as notebooks/04_agents.ipynb runs them on the
embedded model: a LangGraph agent and a LlamaIndex `FunctionAgent`, each with a retriever tool whose documents reach
the engine as cached chunks. Whatever the random model asks for, each answer's cache hits are exactly the retrieved
documents an earlier question already retrieved, and its misses the rest."""

from __future__ import annotations

import asyncio
from typing import Annotated

import pytest
from pydantic import Field

NOTES = {
    "founder.txt": "Maria Lopez founded the Sunrise Bakery in Porto in 1987.",
    "delivery.txt": "The bakery delivers bread to 12 restaurants every morning at 5 am.",
    "cakes.txt": "The orange almond cake weighs 900 grams and is baked on Fridays.",
    "staff.txt": "The bakery employs 24 people; the head baker is Tiago Costa.",
}
QUESTIONS = [f"Question {i} about the bakery?" for i in range(10)]
K = 2
"""Each question retrieves two of the four notes, so by pigeonhole later questions retrieve notes again."""
QUERY_CHARS = 16


@pytest.fixture
def folder(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for name, text in NOTES.items():
        (notes / name).write_text(text + "\n", encoding="utf-8")
    return notes


@pytest.fixture
def engine(make_engine):
    # The tool list goes into the system prompt: more than the tiny model's default 512 positions.
    return make_engine("llama", model_overrides={"max_position_embeddings": 2048})


def _expected(sources, seen):
    """(hits, misses) of an answer over `sources`, given the sources earlier answers used; `seen` grows."""
    hits = sum(source in seen for source in sources)
    seen.update(sources)
    return hits, len(sources) - hits


# ---- LangGraph ---------------------------------------------------------------------------------------------------


def _langgraph_agent(engine, folder):
    pytest.importorskip("langgraph")
    pytest.importorskip("rank_bm25")
    from langchain_community.retrievers import BM25Retriever
    from langchain_core.documents import Document
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from prophet_rag.integrations.langchain import ChatProphet

    documents = [Document(page_content=path.read_text(encoding="utf-8").strip(), metadata={"source": path.name})
                 for path in sorted(folder.glob("*.txt"))]
    retriever = BM25Retriever.from_documents(documents, k=K)

    @tool(response_format="content_and_artifact")
    def search(question: Annotated[str, Field(description="the user's question")]):
        """Search the bakery's notes for the documents that answer a question."""
        found = retriever.invoke(question)
        return "\n\n".join(doc.page_content for doc in found), found

    chat = ChatProphet(engine=engine, max_new_tokens=4)
    caller = chat.bind_tools([search], tool_choice="required", max_string_chars=QUERY_CHARS, max_new_tokens=120)
    instruction = HumanMessage("Answer my question in one short sentence, from the search results.")
    graph = StateGraph(MessagesState)
    graph.add_node("retrieve", lambda state: {"messages": [caller.invoke(state["messages"])]})
    graph.add_node("search", ToolNode([search]))
    graph.add_node("answer", lambda state: {"messages": [chat.invoke([*state["messages"], instruction])]})
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "search")
    graph.add_edge("search", "answer")
    graph.add_edge("answer", END)
    return graph.compile()


@pytest.fixture
def langgraph_runs(engine, folder):
    from langchain_core.messages import HumanMessage

    agent = _langgraph_agent(engine, folder)
    return [agent.invoke({"messages": [HumanMessage(question)]})["messages"] for question in QUESTIONS]


def test_a_langgraph_agent_answers_ten_questions(langgraph_runs):
    from langchain_core.messages import AIMessage, ToolMessage

    assert len(langgraph_runs) == 10
    for _human, _call, result, answer in langgraph_runs:
        assert isinstance(result, ToolMessage) and isinstance(answer, AIMessage)
        assert answer.tool_calls == [] and answer.usage_metadata["output_tokens"] > 0


def test_the_langgraph_agent_calls_its_retriever_tool_with_valid_arguments(langgraph_runs):
    for _human, call, result, _answer in langgraph_runs:
        assert call.invalid_tool_calls == [] and len(call.tool_calls) == 1
        (tool_call,) = call.tool_calls
        assert tool_call["name"] == "search" and set(tool_call["args"]) == {"question"}
        assert isinstance(tool_call["args"]["question"], str) and len(tool_call["args"]["question"]) <= QUERY_CHARS
        assert result.tool_call_id == tool_call["id"] and len(result.artifact) == K


def test_the_langgraph_agent_reuses_the_kv_of_documents_it_retrieved_before(langgraph_runs):
    seen: set[str] = set()
    for human, _call, result, answer in langgraph_runs:
        stats = answer.response_metadata["prophet_rag"]
        sources = [doc.metadata["source"] for doc in result.artifact]
        assert (stats["cache_hits"], stats["cache_misses"]) == _expected(sources, seen), human.content
    assert sum(run[-1].response_metadata["prophet_rag"]["cache_hits"] for run in langgraph_runs) > 0


# ---- LlamaIndex FunctionAgent ------------------------------------------------------------------------------------


@pytest.fixture
def function_agent_runs(engine, folder):
    pytest.importorskip("llama_index.core")
    pytest.importorskip("llama_index.retrievers.bm25")
    import llama_index.core
    from llama_index.core import Settings, SimpleDirectoryReader
    from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult
    from llama_index.core.tools import RetrieverTool, ToolMetadata
    from llama_index.retrievers.bm25 import BM25Retriever
    from pydantic import BaseModel

    from prophet_rag.integrations.llama_index import ProphetKVPostprocessor, ProphetLLM

    class Search(BaseModel):
        input: str = Field(max_length=QUERY_CHARS, description="the user's question")

    saved = Settings._llm, llama_index.core.global_tokenizer
    llm = ProphetLLM(engine=engine, max_new_tokens=120)
    documents = SimpleDirectoryReader(str(folder), file_metadata=lambda path: {"file": path.rsplit("/", 1)[-1]})
    retriever = BM25Retriever.from_defaults(nodes=documents.load_data(), similarity_top_k=K)
    search = RetrieverTool(retriever, ToolMetadata(name="search", description="Search the bakery's notes.",
                                                   fn_schema=Search),
                           node_postprocessors=[ProphetKVPostprocessor(llm=llm)])
    # The first step must call the tool (a forced, constrained call); after the result the model answers freely.
    agent = FunctionAgent(tools=[search], llm=llm, initial_tool_choice="search", allow_parallel_tool_calls=False,
                          streaming=False, system_prompt="Answer in one short sentence.")

    async def run(question):
        events = []
        handler = agent.run(user_msg=question)
        async for event in handler.stream_events():
            if isinstance(event, (ToolCallResult, AgentOutput)):
                events.append(event)
        await handler
        return events

    try:
        yield [asyncio.run(run(question)) for question in QUESTIONS[:3]]
    finally:
        Settings._llm, llama_index.core.global_tokenizer = saved


def test_a_function_agent_calls_its_retriever_tool_first_then_answers_from_its_nodes(function_agent_runs):
    from llama_index.core.agent.workflow import AgentOutput, ToolCallResult

    seen: set[str] = set()
    for events in function_agent_runs:
        call, result = events[0], events[1]
        assert isinstance(call, AgentOutput) and [c.tool_name for c in call.tool_calls] == ["search"]
        assert isinstance(result, ToolCallResult) and set(result.tool_kwargs) == {"input"}
        assert len(result.tool_kwargs["input"]) <= QUERY_CHARS and not result.tool_output.is_error
        # The step after the first tool result is the one that reads its nodes.
        stats = events[2].raw["prophet_rag"]
        sources = [n.node.metadata["file"] for n in result.tool_output.raw_output]
        assert (stats["cache_hits"], stats["cache_misses"]) == _expected(sources, seen)
