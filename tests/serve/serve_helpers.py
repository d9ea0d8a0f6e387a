"""What the serve tests share: free ports, waiting for health, the served process's handle, a scripted engine and
an in-thread server."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from prophet_rag.config import GenerationConfig, PromptConfig
from prophet_rag.engine import AnswerStream
from prophet_rag.errors import ContextWindowError
from prophet_rag.layout import PromptBuilder
from prophet_rag.results import Answer, RequestStats

API_KEY = "test-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, log: Path | None = None,
                 timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no healthy server at {url} after {timeout_s} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Served:
    url: str
    model_dir: object
    proc: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0


# Limits small enough to test, large enough for the tests' requests.
LIMITS = {"max_documents": 4, "max_chars": 4000, "max_body_bytes": 20_000}


# ---- a scripted engine, for what depends on timing (queueing, cancellation, timeouts) -----------------------------

@dataclass
class _Tier:
    name: str

    def stats(self):
        return type("Stats", (), {"hits": 0, "misses": 0})()


@dataclass
class _Cache:
    tiers: list = field(default_factory=lambda: [_Tier("memory"), _Tier("disk")])


class ScriptedEngine:
    """Stands in for `ProphetEngine` behind the scheduler: each request's tokens come out only as the test
    releases them (`release(n)`), so a test decides what is running, waiting or finished. A request whose last
    user message says "too long" fails its checks as a context-window error would."""

    model_name = "scripted"
    context_window = 2048

    def __init__(self) -> None:
        self.generation = GenerationConfig(max_new_tokens=8)
        self.builder = PromptBuilder(None, PromptConfig())
        self.cache = _Cache()
        self._tokens = threading.Semaphore(0)
        self.started: list[str] = []
        self.yielded = 0
        self.closed = threading.Event()
        """Set when a request's generator ends without having finished (it was closed)."""

    def release(self, n: int = 1) -> None:
        self._tokens.release(n)

    def stream_chat(self, messages, documents=(), *, method=None, ratio=None, generation=None) -> AnswerStream:
        text = messages[-1]["content"]
        text = text if isinstance(text, str) else "".join(p for p in text if isinstance(p, str))
        if "too long" in text:
            raise ContextWindowError("the request needs more tokens than the window; retrieve fewer chunks.")
        self.started.append(text)
        return AnswerStream(self._run(generation or self.generation))

    def _run(self, generation: GenerationConfig):
        emitted = []
        finished = False
        try:
            for i in range(generation.max_new_tokens):
                self._tokens.acquire()
                self.yielded += 1
                emitted.append(f"t{i} ")
                yield emitted[-1]
            finished = True
        finally:
            if not finished:
                self.closed.set()
        stats = RequestStats("full", 1.0, 0, 0, 3, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, new_tokens=len(emitted))
        return Answer("".join(emitted), tuple(range(len(emitted))), stats, torch.zeros(0, dtype=torch.long))


class LiveServer:
    """uvicorn serving `app` in a thread of this process, on a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url, timeout_s=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
