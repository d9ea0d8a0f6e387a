"""ChatProphet, ProphetLangChainLLM and ProphetRAG in LCEL chains (tiny random model, in-memory retriever, offline).

The model's output is gibberish, so the tests check structure: the messages and documents that reach the engine,
cache hits, usage and statistics, callbacks, and that invoke, stream, batch and async agree.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core")

import warnings

from langchain_classic.chains import create_retrieval_chain
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder, PromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from prophet_rag import InvalidRequestError
from prophet_rag.config import DEFAULT_INSTRUCTION, SelectionConfig
from prophet_rag.integrations import common
from prophet_rag.integrations.langchain import ChatProphet, ProphetLangChainLLM, ProphetRAG, runs
from prophet_rag.layout import DOCUMENTS

QUESTION = "How heavy is widget 2?"
NEW_TOKENS = 6
FACTS = [f"Fact {i}: widget {i} weighs {i} kg." for i in range(5)]


@pytest.fixture
def engine(make_engine):
    return make_engine("llama")


@pytest.fixture
def chat(engine):
    return ChatProphet(engine=engine, max_new_tokens=NEW_TOKENS)


@pytest.fixture
def llm(engine):
    return ProphetLangChainLLM(engine=engine, max_new_tokens=NEW_TOKENS)


@pytest.fixture
def retriever():
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=8))
    store.add_texts(FACTS)
    return store.as_retriever(search_kwargs={"k": 3})


@pytest.fixture(params=["chat", "llm"])
def model(request, chat, llm):
    return {"chat": chat, "llm": llm}[request.param]


@pytest.fixture
def chain(model, retriever):
    return {"context": retriever, "question": RunnablePassthrough()} | ProphetRAG(llm=model) | StrOutputParser()


# LangChain's RAG tutorials: create_retrieval_chain's system prompt, and the "rlm/rag-prompt" hand-written chains use.
TUTORIAL_PROMPT = ChatPromptTemplate([
    ("system", "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
               "answer the question.\n\n{context}"),
    ("human", "{input}"),
])
RAG_PROMPT = ChatPromptTemplate([("human", "You are an assistant for question-answering tasks. Use the following "
                                           "pieces of retrieved context to answer the question.\nQuestion: "
                                           "{question} \nContext: {context} \nAnswer:")])


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


class Ends(BaseCallbackHandler):
    """The statistics each model answer reports, as a tracer sees them (the chains return text only)."""

    def __init__(self) -> None:
        self.stats: list[dict] = []

    def on_llm_end(self, response, **kwargs) -> None:
        generation = response.generations[0][0]
        info = generation.message.response_metadata if hasattr(generation, "message") else generation.generation_info
        self.stats.append(info["prophet_rag"])


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.starts = 0

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.starts += 1

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.starts += 1

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)


# ---- 2. plain calls are plain ---------------------------------------------------------------------------------


def test_a_chat_prompt_reaches_the_chat_template_as_messages(chat, calls):
    prompt = ChatPromptTemplate([("system", "You are a pirate."), ("human", "{question}")])
    (prompt | chat).invoke({"question": "List three colors."})
    assert calls[-1]["messages"] == [{"role": "system", "content": "You are a pirate."},
                                     {"role": "user", "content": "List three colors."}]
    assert calls[-1]["documents"] == [] and calls[-1]["stream"].answer.stats.method == "full"


def test_a_text_prompt_is_one_user_message_answered_with_full_prefill(llm, engine, calls):
    text = llm.invoke("List three colors, one per line.")
    assert calls[-1]["messages"] == [{"role": "user", "content": "List three colors, one per line."}]
    assert text == engine.chat(calls[-1]["messages"], generation=llm.configs({})[1]).text
    assert len(engine.store) == 0


def test_system_prompt_opens_calls_that_bring_none(engine, calls):
    chat = ChatProphet(engine=engine, max_new_tokens=NEW_TOKENS, system_prompt="Be brief.")
    chat.invoke("Hi")
    chat.invoke([SystemMessage("Be long."), HumanMessage("Hi")])
    assert [c["messages"][0]["content"] for c in calls] == ["Be brief.", "Be long."]


def test_conversations_keep_their_roles(chat, calls):
    chat.invoke([SystemMessage("S"), HumanMessage("U1"), AIMessage("A1"), HumanMessage("U2", name="me")])
    assert [(m["role"], m["content"]) for m in calls[-1]["messages"]] == [
        ("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]


def test_non_text_content_is_refused(chat):
    image = HumanMessage(content=[{"type": "image", "url": "https://example.invalid/a.png"}])
    with pytest.raises(InvalidRequestError, match="'image' block"):
        chat.invoke([image])


# ---- 3. documents go where the prompt puts them; history and system prompt stay ---------------------------------


def test_default_prompt_makes_the_engines_own_request(chat, engine, calls):
    message = ProphetRAG(llm=chat).invoke({"context": FACTS[:3], "question": QUESTION})
    assert calls[-1]["messages"] == [
        {"role": "user", "content": [f"{DEFAULT_INSTRUCTION}\n\n", DOCUMENTS, f"Question: {QUESTION}"]}]
    expected = engine.answer(FACTS[:3], QUESTION, generation=chat.configs({})[1])
    assert message.content == expected.text


def test_a_chat_prompt_with_history_keeps_its_order(chat, calls):
    prompt = ChatPromptTemplate([("system", "You are a pirate. Use these notes:\n{context}\nEnd of notes."),
                                 MessagesPlaceholder("history"), ("human", "{question}")])
    history = [HumanMessage("Hi"), AIMessage("Ahoy")]
    ProphetRAG(llm=chat, prompt=prompt).invoke({"context": FACTS[:2], "question": QUESTION, "history": history})
    assert calls[-1]["messages"] == [
        {"role": "system", "content": ["You are a pirate. Use these notes:\n", DOCUMENTS, "End of notes."]},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"},
        {"role": "user", "content": QUESTION}]
    assert calls[-1]["documents"] == FACTS[:2] and not calls[-1]["transient_prefix"]


def test_a_question_before_the_documents_makes_a_one_off_prefix(chat, calls):
    ProphetRAG(llm=chat, prompt="Question: {question}\nNotes:\n{context}").invoke({"context": FACTS[:2],
                                                                                 "question": QUESTION})
    assert calls[-1]["transient_prefix"]


def test_the_readable_prompt_reaches_callbacks(llm):
    prompts = []

    class Prompts(BaseCallbackHandler):
        def on_llm_start(self, serialized, p, **kwargs) -> None:
            prompts.extend(p)

    ProphetRAG(llm=llm, prompt="Notes:\n{context}\nQ: {question}").invoke(
        {"context": FACTS[:2], "question": QUESTION}, config={"callbacks": [Prompts()]})
    assert prompts == [f"Notes:\n{FACTS[0]}\n\n{FACTS[1]}\nQ: {QUESTION}"]


def test_invoke_sends_each_retrieved_document_as_a_cached_chunk(chain, calls):
    chain.invoke(QUESTION)
    chain.invoke(QUESTION)
    first, second = calls
    assert len(first["documents"]) == 3 and set(first["documents"]) <= set(FACTS)
    assert (first["stream"].answer.stats.cache_misses, second["stream"].answer.stats.cache_hits) == (3, 3)


def assert_every_path_agrees(chain) -> None:
    """invoke, stream, batch, ainvoke and astream of a text chain give the same answer."""
    done = chain.invoke(QUESTION)
    assert "".join(chain.stream(QUESTION)) == done
    assert chain.batch([QUESTION, QUESTION]) == [done, done]

    async def run():
        return await chain.ainvoke(QUESTION), "".join([d async for d in chain.astream(QUESTION)])

    assert asyncio.run(run()) == (done, done)


def test_stream_batch_and_async_match_invoke(chain):
    assert_every_path_agrees(chain)


def test_callbacks_see_one_model_run_with_its_tokens(chain):
    recorder = Recorder()
    deltas = list(chain.stream(QUESTION, config={"callbacks": [recorder]}))
    assert recorder.starts == 1 and "".join(recorder.tokens) == "".join(deltas)


@pytest.mark.parametrize("key", ["question", "input"])
def test_accepts_strings_documents_and_alternative_keys(chat, calls, key):
    ProphetRAG(llm=chat).invoke({"documents": [Document(page_content=FACTS[0]), FACTS[1]], key: QUESTION})
    assert calls[-1]["documents"] == FACTS[:2]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("just a string", "takes a dict"),
        ({"context": FACTS}, "question"),
        ({"question": QUESTION}, "list of Documents or strings"),
        ({"context": "joined text", "question": QUESTION}, "not a joined string"),
        ({"context": [], "question": QUESTION}, "empty 'context'"),
        ({"context": [FACTS[0], 3], "question": QUESTION}, "context document 1"),
    ],
)
def test_bad_input_names_the_problem(chat, value, message):
    with pytest.raises(InvalidRequestError, match=message):
        ProphetRAG(llm=chat).invoke(value)


def test_a_prompt_without_context_or_a_variable_is_refused(chat):
    with pytest.raises(InvalidRequestError, match="context"):
        ProphetRAG(llm=chat, prompt="Q: {question}")
    with pytest.raises(InvalidRequestError, match="tone"):
        ProphetRAG(llm=chat, prompt="{tone}: {context} {question}").invoke({"context": FACTS, "question": QUESTION})


# ---- 4. the tutorial chains: the documents are found in the prompt the model receives ----------------------------


def test_the_retrieval_chain_tutorial_reuses_every_retrieved_document(model, retriever, calls):
    chain = create_retrieval_chain(retriever, create_stuff_documents_chain(model, TUTORIAL_PROMPT))
    ends = Ends()
    first = chain.invoke({"input": QUESTION}, config={"callbacks": [ends]})
    second = chain.invoke({"input": QUESTION}, config={"callbacks": [ends]})
    retrieved = [doc.page_content for doc in first["context"]]
    assert [c["documents"] for c in calls] == [retrieved, retrieved] and not any(calls[0]["transient"])
    assert [(s["cache_hits"], s["cache_misses"]) for s in ends.stats] == [(0, 3), (3, 0)]  # a fresh store, then warm
    assert first["answer"] == second["answer"]


def test_the_retrieval_chain_answers_as_prophet_rag_does(chat, retriever, calls):
    tutorial = create_retrieval_chain(retriever, create_stuff_documents_chain(chat, TUTORIAL_PROMPT))
    ours = create_retrieval_chain(retriever, ProphetRAG(llm=chat, prompt=TUTORIAL_PROMPT, output="text"))
    assert tutorial.invoke({"input": QUESTION})["answer"] == ours.invoke({"input": QUESTION})["answer"]
    assert calls[0]["messages"] == calls[1]["messages"] and calls[0]["documents"] == calls[1]["documents"]
    assert calls[0]["messages"][0]["content"][1] is DOCUMENTS


def test_the_hand_written_chain_finds_its_documents_on_every_path(model, retriever, calls):
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | RAG_PROMPT | model
    assert_every_path_agrees(chain | StrOutputParser())
    retrieved = [doc.page_content for doc in retriever.invoke(QUESTION)]
    assert len(calls) == 6 and all(c["documents"] == retrieved for c in calls)
    # The question comes before the context in this prompt: the prefix holds it, so it is never stored.
    assert all(c["transient_prefix"] for c in calls)


def test_concurrent_runs_each_find_only_their_own_documents(chat, retriever, calls):
    questions = [QUESTION, "Which widget weighs 4 kg?", "Tell me about widget 0."]
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | RAG_PROMPT | chat
    chain.batch(questions)
    found = {c["messages"][0]["content"][0]: c["documents"] for c in calls}
    for question in questions:
        prefix = next(key for key in found if question in key)
        assert found[prefix] == [doc.page_content for doc in retriever.invoke(question)]


def test_documents_given_to_the_chain_with_headers_keep_the_headers_as_one_off_text(chat, calls):
    header = PromptTemplate.from_template("Source {source}:\n{page_content}")
    chain = create_stuff_documents_chain(chat, TUTORIAL_PROMPT, document_prompt=header)
    docs = [Document(page_content=fact, metadata={"source": i}) for i, fact in enumerate(FACTS[:3])]
    chain.invoke({"context": docs, "input": QUESTION})
    assert calls[-1]["documents"] == [FACTS[0], "Source 1:", FACTS[1], "Source 2:", FACTS[2]]
    assert calls[-1]["transient"] == [False, True, False, True, False]
    assert calls[-1]["messages"][0]["content"][0].endswith("\n\nSource 0:\n")


def test_documents_rewritten_on_the_way_warn_once_and_are_answered_as_plain_text(chat, retriever, calls):
    shout = RunnableLambda(lambda docs: " / ".join(doc.page_content.upper() for doc in docs))
    chain = {"context": retriever | shout, "question": RunnablePassthrough()} | RAG_PROMPT | chat
    with pytest.warns(UserWarning, match="none of them is in its prompt verbatim.*ProphetRAG") as caught:
        chain.invoke(QUESTION)
        chain.invoke(QUESTION)
    assert len([w for w in caught if "verbatim" in str(w.message)]) == 1
    assert [c["documents"] for c in calls] == [[], []]


def test_a_chain_that_retrieves_nothing_is_a_plain_chat_without_warnings(chat, calls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (TUTORIAL_PROMPT | chat).invoke({"input": QUESTION, "context": FACTS[0]})
    assert calls[-1]["documents"] == [] and calls[-1]["stream"].answer.stats.method == "full"


def test_documents_of_an_earlier_run_are_not_found_in_a_later_one(chat, retriever, calls):
    retriever.invoke(QUESTION)  # a run of its own, ended
    (TUTORIAL_PROMPT | chat).invoke({"input": QUESTION, "context": format_docs(retriever.invoke(QUESTION))})
    assert calls[-1]["documents"] == []


def test_runs_are_forgotten_when_they_end(chat, retriever):
    open_runs = runs.RUNS.open_runs()
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | RAG_PROMPT
    (chain | chat).invoke(QUESTION)
    list((chain | chat).stream(QUESTION))
    with pytest.raises(InvalidRequestError):
        (chain | chat.bind(max_new_tokens=0)).invoke(QUESTION)
    assert runs.RUNS.open_runs() == open_runs


@pytest.mark.parametrize("path", ["tutorial", "prophet_rag"])
def test_an_empty_retrieved_document_is_refused_on_both_paths(chat, path):
    docs = [Document(page_content=FACTS[0]), Document(page_content=" \n ")]
    combine = (create_stuff_documents_chain(chat, TUTORIAL_PROMPT) if path == "tutorial"
               else ProphetRAG(llm=chat, prompt=TUTORIAL_PROMPT))
    with pytest.raises(InvalidRequestError, match="document 1 is empty.*Drop empty documents"):
        combine.invoke({"context": docs, "input": QUESTION})


# ---- ProphetRAG takes bound models and per-call options; its output ----------------------------------------------


def test_prophet_rag_takes_bound_and_configured_models(chat, calls):
    inputs = {"context": FACTS[:2], "question": QUESTION}
    ProphetRAG(llm=chat.bind(max_new_tokens=2)).invoke(inputs)
    ProphetRAG(llm=chat.with_config(tags=["x"]).bind(max_new_tokens=3)).invoke(inputs)
    configurable = chat.configurable_fields(method=ConfigurableField(id="method"))
    ProphetRAG(llm=configurable).invoke(inputs, config={"configurable": {"method": "full"}})
    assert [c["stream"].answer.stats.new_tokens for c in calls[:2]] == [2, 3]
    assert calls[2]["method"] == "full" and all(c["documents"] == FACTS[:2] for c in calls)


def test_prophet_rag_passes_per_call_options_to_the_model(chat, calls):
    rag = ProphetRAG(llm=chat).bind(max_new_tokens=2)
    inputs = {"context": FACTS[:2], "question": QUESTION}
    rag.invoke(inputs)
    list(rag.stream(inputs))

    async def run():
        await rag.ainvoke(inputs)
        return [d async for d in rag.astream(inputs)]

    asyncio.run(run())
    assert [c["stream"].answer.stats.new_tokens for c in calls] == [2, 2, 2, 2]
    with pytest.raises(InvalidRequestError, match="unknown option"):
        ProphetRAG(llm=chat).bind(foo=1).invoke(inputs)


def test_prophet_rag_refuses_a_model_that_cannot_take_documents():
    with pytest.raises(InvalidRequestError, match="needs a ChatProphet"):
        ProphetRAG(llm=RunnableLambda(lambda x: x))


def test_prophet_rag_output_is_the_models_message_or_its_text(chat, retriever):
    inputs = {"context": FACTS[:2], "question": QUESTION}
    message = ProphetRAG(llm=chat).invoke(inputs)
    assert isinstance(message, AIMessage) and message.response_metadata["prophet_rag"]["cache_misses"] == 2
    text = ProphetRAG(llm=chat, output="text")
    assert text.invoke(inputs) == message.content
    deltas = list(text.stream(inputs))
    assert all(isinstance(d, str) for d in deltas) and "".join(deltas) == message.content
    answer = create_retrieval_chain(retriever, text).invoke({"input": QUESTION})["answer"]
    assert isinstance(answer, str) and not isinstance(answer, BaseMessage)


# ---- 5. usage and statistics ----------------------------------------------------------------------------------


def test_chat_answers_carry_usage_and_statistics(chat):
    message = chat.invoke("Hi")
    stats = message.response_metadata["prophet_rag"]
    assert message.usage_metadata == {"input_tokens": stats["suffix_tokens"], "output_tokens": stats["new_tokens"],
                                      "total_tokens": stats["suffix_tokens"] + stats["new_tokens"],
                                      "input_token_details": {"cache_read": stats["cached_tokens"]}}
    assert message.response_metadata["finish_reason"] == "length"
    chunks = list(chat.stream("Hi"))
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata == message.usage_metadata
    assert sum(1 for c in chunks if c.usage_metadata) == 1


def test_text_llm_results_carry_usage_and_statistics(llm):
    result = llm.generate(["Hi", "Hello"])
    infos = [g[0].generation_info for g in result.generations]
    assert all(info["prophet_rag"]["method"] == "full" for info in infos)
    assert result.llm_output["token_usage"]["output_tokens"] == sum(i["prophet_rag"]["new_tokens"] for i in infos)


# ---- 6. settings, per-call options, token counting ------------------------------------------------------------


def test_per_call_options_apply(model):
    def new_tokens(**options) -> int:
        result = model.generate(["Hi"], **options) if isinstance(model, ProphetLangChainLLM) else None
        if result is not None:
            return result.generations[0][0].generation_info["prophet_rag"]["new_tokens"]
        return model.invoke("Hi", **options).usage_metadata["output_tokens"]

    assert new_tokens(max_new_tokens=2) == 2 and new_tokens(max_tokens=3) == 3


def test_stop_strings_end_generation(model):
    full = StrOutputParser().invoke(model.invoke("Hi"))
    stopped = StrOutputParser().invoke(model.invoke("Hi", stop=[full.strip()[:2]]))
    assert full.strip()[:2] not in stopped and len(stopped) < len(full)


@pytest.mark.parametrize(("bad", "message"), [({"foo": 1}, "unknown option"), ({"method": "nope"}, "unknown method")])
def test_bad_per_call_options_are_refused(chat, bad, message):
    with pytest.raises(InvalidRequestError, match=message):
        chat.invoke("Hi", **bad)


def test_unknown_settings_are_refused_and_remote_ones_accepted(engine):
    with pytest.raises(InvalidRequestError, match="unknown argument"):
        ChatProphet(engine=engine, temprature=0.5)
    chat = ChatProphet(engine=engine, timeout=60, max_retries=2, api_key="x", max_tokens=9, stop=["\n"])
    assert (chat.max_new_tokens, chat.stop) == (9, ["\n"])


def test_configurable_fields_keep_the_loaded_engine(chat, engine, calls, monkeypatch):
    monkeypatch.setattr(common, "load_engine", lambda *args: pytest.fail("the model was loaded again"))
    configurable = chat.configurable_fields(method=ConfigurableField(id="method"))
    configurable.with_config(configurable={"method": "full"}).invoke("Hi")
    chat.bind(max_new_tokens=2).invoke("Hi")
    assert [c["method"] for c in calls] == ["full", SelectionConfig.method]
    assert calls[1]["stream"].answer.stats.new_tokens == 2


def test_token_counts_come_from_the_models_tokenizer(chat, engine):
    text = "Widgets weigh 4821 kg."
    assert chat.get_num_tokens(text) == len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    message = chat.invoke("Hi")
    assert chat.get_num_tokens_from_messages([HumanMessage("Hi")]) == message.usage_metadata["input_tokens"]
