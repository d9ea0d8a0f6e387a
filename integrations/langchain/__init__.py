"""LangChain integration: `ChatProphet` (a chat model), `ProphetLangChainLLM` (a text LLM) and `ProphetRAG`, the
runnable that keeps retrieved documents apart.

Both models render calls with the model's own chat template (a text prompt is one user message, behind
`system_prompt`). The chains LangChain's tutorials write work as they are, with the model swapped:

    chain = create_retrieval_chain(retriever, create_stuff_documents_chain(ChatProphet(), prompt))
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | ChatProphet()

A model in such a chain receives one rendered prompt, the documents joined into it. It finds them there by their
exact content: the documents its run retrieved are recorded as the run goes (runs.py) and located in the prompt
(integrations/placement.py), so each one is a cached chunk, and the template's text around them stays as rendered.
A call whose run retrieved nothing is a plain chat: full prefill, nothing stored. When the run retrieved documents
but none of them is in the prompt verbatim (a formatter that rewrote them), the call is answered as plain text and a
warning says so once.

`ProphetRAG` takes the place of `prompt | llm` and hands the model the documents themselves:

    rag = ProphetRAG(llm=ChatProphet(), prompt=prompt)   # prompt: any template with {context} and {question}
    chain = {"context": retriever, "question": RunnablePassthrough()} | rag | StrOutputParser()

It renders its prompt template with the context's place marked (integrations/placement.py) and passes that request
beside the readable prompt, as the `prophet_request` keyword of `llm.invoke`/`stream`/`ainvoke`/`astream`.
Callbacks, token streaming, batch and async work as for any model run. Usage (`usage_metadata`, `llm_output`) and the
request's statistics (`response_metadata["prophet_rag"]`, `generation_info`) come with every answer.

This module is the public face; the pieces: `models` (ChatProphet, ProphetLangChainLLM), `messages` (LangChain
messages as the engine takes them, answers as LangChain messages), `rag` (ProphetRAG), `runs` (the documents each run
retrieved).
"""

from prophet_rag.integrations.langchain.models import ChatProphet, ProphetLangChainLLM
from prophet_rag.integrations.langchain.rag import DEFAULT_PROMPT, ProphetRAG

__all__ = ["DEFAULT_PROMPT", "ChatProphet", "ProphetLangChainLLM", "ProphetRAG"]
