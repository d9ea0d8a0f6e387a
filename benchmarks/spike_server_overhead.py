"""Spike (issue 21, phase 1): what `prophet-rag serve` itself costs per request, with the model taken out.

    python benchmarks/spike_server_overhead.py                 # 300 requests of each kind, one client, keep-alive

The app (FastAPI routes, the scheduler's worker thread and its hand-over to the event loop, JSON and SSE encoding),
served by uvicorn in this process, answers from an engine that costs nothing: every request yields `--tokens` fixed
text deltas at once. The client is httpx over loopback, one request at a time. The medians are the server's
overhead per request (and per streamed token), to hold against the model's own TTFT and per-token time.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from prophet_rag.config import GenerationConfig, PromptConfig
from prophet_rag.engine import AnswerStream
from prophet_rag.layout import PromptBuilder
from prophet_rag.results import Answer, RequestStats
from prophet_rag.serve.app import create_app
from prophet_rag.serve.config import ServeConfig


class FreeEngine:
    """Answers every request with `tokens` deltas and no compute."""

    model_name = "free"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.generation = GenerationConfig(max_new_tokens=tokens)
        self.builder = PromptBuilder(None, PromptConfig())
        self.cache = type("Cache", (), {"tiers": []})()

    def stream_chat(self, messages, documents=(), **_options) -> AnswerStream:
        return AnswerStream(self._run())

    def _run(self):
        for _ in range(self.tokens):
            yield "tok "
        stats = RequestStats("full", 1.0, 0, 0, 3, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, new_tokens=self.tokens)
        return Answer("tok " * self.tokens, tuple(range(self.tokens)), stats, torch.zeros(0, dtype=torch.long))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(FreeEngine(args.tokens), ServeConfig()), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    body = {"messages": [{"role": "user", "content": "q"}], "documents": ["a document"]}
    with httpx.Client(base_url=url) as client:
        for name, extra in (("whole answer", {}), ("stream", {"stream": True})):
            times = []
            for i in range(args.requests + 20):
                start = time.perf_counter()
                response = client.post("/v1/chat/completions", json={**body, **extra})
                assert response.status_code == 200 and "tok" in response.text
                if i >= 20:  # the first requests warm up connections and code paths
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            print(f"{name}, {args.tokens} tokens: median {median * 1000:.2f} ms per request, "
                  f"p95 {statistics.quantiles(times, n=20)[-1] * 1000:.2f} ms "
                  f"({median / args.tokens * 1000:.3f} ms per token)")
    server.should_exit = True
    thread.join(10)


if __name__ == "__main__":
    main()
