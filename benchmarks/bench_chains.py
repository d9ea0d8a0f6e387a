"""TTFT of LangChain's RAG tutorial chain with ChatProphet, on a warm store: before and after documents were found
in the prompt, interleaved, with ProphetRAG beside them.

    python benchmarks/bench_chains.py [--model PATH] [--repeats 5] [--k 4]

The chain is `create_retrieval_chain(BM25 retriever, create_stuff_documents_chain(ChatProphet, prompt))` over
notebooks/data/bakery. "before" is the same chain with the run's documents hidden from the model, which is what it
received before ChatProphet looked them up: the rendered prompt alone, answered by full prefill. "after" finds them
(cache hits, prophet_focus). "prophet_rag" is `create_retrieval_chain(retriever, ProphetRAG(..., output="text"))`.
Every question runs once first, so every document's KV is stored; then each repeat runs the three arms on every
question, in an order that rotates, so that machine noise falls on all of them alike. One new token per answer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from unittest import mock

from langchain_classic.chains import create_retrieval_chain
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_community.retrievers import BM25Retriever
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate

from prophet_rag import ProphetEngine, StoreConfig
from prophet_rag.integrations.langchain import ChatProphet, ProphetRAG, runs

DATA = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "bakery"
QUESTIONS = [
    "Who founded the Sunrise Bakery?",
    "What is the bakery famous for?",
    "How long does the sourdough dough rest?",
    "How many restaurants get bread deliveries?",
    "Who is the head baker?",
    "When did the bakery open its harbour shop?",
]
PROMPT = ChatPromptTemplate([
    ("system", "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
               "answer the question. If you don't know the answer, say that you don't know.\n\n{context}"),
    ("human", "{input}"),
])


class Stats(BaseCallbackHandler):
    def __init__(self) -> None:
        self.last: dict = {}

    def on_llm_end(self, response, **kwargs) -> None:
        self.last = response.generations[0][0].message.response_metadata["prophet_rag"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=4, help="documents retrieved per question")
    args = parser.parse_args()

    documents = [Document(page_content=p.read_text().strip()) for p in sorted(DATA.glob("*.txt"))]
    retriever = BM25Retriever.from_documents(documents, k=args.k)
    with tempfile.TemporaryDirectory() as store, \
            ProphetEngine.from_pretrained(args.model, store=StoreConfig(directory=store)) as engine:
        chat = ChatProphet(engine=engine, max_new_tokens=1)
        tutorial = create_retrieval_chain(retriever, create_stuff_documents_chain(chat, PROMPT))
        rag = create_retrieval_chain(retriever, ProphetRAG(llm=chat, prompt=PROMPT, output="text"))
        stats = Stats()

        def run(arm: str, question: str) -> dict:
            chain = rag if arm == "prophet_rag" else tutorial
            if arm == "before":
                with mock.patch.object(runs.RUNS, "seen", return_value=None):
                    chain.invoke({"input": question}, config={"callbacks": [stats]})
            else:
                chain.invoke({"input": question}, config={"callbacks": [stats]})
            return stats.last

        arms = ["before", "after", "prophet_rag"]
        for question in QUESTIONS:  # warm-up: stores every retrieved document and the prompt's prefix
            for arm in arms:
                run(arm, question)
        ttft: dict[str, list[float]] = {arm: [] for arm in arms}
        hits: dict[str, int] = dict.fromkeys(arms, 0)
        for repeat in range(args.repeats):
            for i, question in enumerate(QUESTIONS):
                shift = (repeat + i) % len(arms)
                for arm in arms[shift:] + arms[:shift]:
                    result = run(arm, question)
                    ttft[arm].append(result["ttft_s"] * 1000)
                    hits[arm] += result["cache_hits"]
        print(f"{engine.model_name}, {len(QUESTIONS)} questions x {args.repeats} repeats, k={args.k}, warm store")
        for arm in arms:
            values = ttft[arm]
            print(f"{arm:12} mean TTFT {statistics.mean(values):7.1f} ms  median {statistics.median(values):7.1f} ms"
                  f"  cache hits {hits[arm]}/{len(values) * args.k}")
        print(f"after / before: {statistics.mean(ttft['after']) / statistics.mean(ttft['before']):.2f}x mean, "
              f"{statistics.median(ttft['after']) / statistics.median(ttft['before']):.2f}x median")


if __name__ == "__main__":
    main()
