"""Queueing, back-pressure, cancellation and timeouts, over a scripted engine whose tokens the test releases: the
scheduler alone, then through a live server with real HTTP clients."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prophet_rag.config import GenerationConfig
from prophet_rag.errors import ContextWindowError, OverloadedError
from prophet_rag.serve.scheduler import EngineRequest, Scheduler
from serve_helpers import ScriptedEngine


def request(text: str = "hello", tokens: int = 3) -> EngineRequest:
    return EngineRequest(({"role": "user", "content": text},), (), GenerationConfig(max_new_tokens=tokens))


async def collect(job) -> str:
    return "".join([delta async for delta in job])


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ---- the scheduler ----------------------------------------------------------------------------------------------

async def test_a_job_runs_to_its_answer():
    engine = ScriptedEngine()
    scheduler = Scheduler(engine, max_in_flight=1, max_queue=0)
    job = scheduler.submit(request(tokens=3))
    engine.release(3)
    await job.started()
    assert await collect(job) == "t0 t1 t2 " and job.answer.text == "t0 t1 t2 "
    scheduler.close()


class _ThreadRecording(ScriptedEngine):
    """Records the thread each request runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def stream_chat(self, messages, documents=(), **options):
        self.threads.append(threading.current_thread().name)
        return super().stream_chat(messages, documents, **options)


async def test_requests_one_after_another_run_on_the_worker_that_went_idle_last():
    # One thread keeps the engine's compute, so torch keeps one OpenMP pool (see Scheduler).
    engine = _ThreadRecording()
    scheduler = Scheduler(engine, max_in_flight=4, max_queue=0)
    for text in "abcdef":
        job = scheduler.submit(request(text, tokens=1))
        engine.release(1)
        await collect(job)
        wait_for(lambda: scheduler.in_flight == 0)  # the answer is out before its worker is idle again
    assert len(engine.threads) == 6 and len(set(engine.threads)) == 1
    scheduler.close()


async def test_requests_at_once_each_get_a_worker():
    engine = _ThreadRecording()
    scheduler = Scheduler(engine, max_in_flight=3, max_queue=0)
    jobs = [scheduler.submit(request(text, tokens=1)) for text in "abc"]
    for job in jobs:
        await job.started()
    assert scheduler.in_flight == 3 and len(set(engine.threads)) == 3
    engine.release(3)
    assert [await collect(job) for job in jobs] == ["t0 "] * 3
    scheduler.close()


async def test_after_a_burst_one_worker_is_left_and_it_takes_the_next_request():
    # The threads of a burst end once it is over, and with them their OpenMP pools (see Scheduler).
    engine = _ThreadRecording()
    scheduler = Scheduler(engine, max_in_flight=4, max_queue=0)
    assert scheduler.workers == 0
    jobs = [scheduler.submit(request(text, tokens=1)) for text in "abcd"]
    for job in jobs:
        await job.started()
    assert scheduler.workers == 4
    engine.release(4)
    for job in jobs:
        await collect(job)
    wait_for(lambda: scheduler.workers == 1 and scheduler.in_flight == 0)
    (left,) = scheduler._workers
    later = scheduler.submit(request("e", tokens=1))
    engine.release(1)
    await collect(later)
    assert engine.threads[-1] == left.name and left.is_alive()
    scheduler.close()
    assert scheduler.workers == 0 and not left.is_alive()


async def test_workers_never_exceed_max_in_flight():
    engine = _ThreadRecording()
    scheduler = Scheduler(engine, max_in_flight=2, max_queue=4)
    jobs = [scheduler.submit(request(text, tokens=1)) for text in "abcde"]
    await jobs[0].started()
    await jobs[1].started()
    assert (scheduler.workers, scheduler.in_flight, scheduler.queue_depth) == (2, 2, 3)
    engine.release(5)
    assert [await collect(job) for job in jobs] == ["t0 "] * 5
    assert len(set(engine.threads)) == 2
    scheduler.close()


async def test_the_queue_is_bounded_and_a_full_one_refuses_at_once():
    engine = ScriptedEngine()
    scheduler = Scheduler(engine, max_in_flight=1, max_queue=2)
    running = scheduler.submit(request("a"))
    await running.started()
    waiting = [scheduler.submit(request(x)) for x in "bc"]
    assert (scheduler.in_flight, scheduler.queue_depth) == (1, 2)
    with pytest.raises(OverloadedError):
        scheduler.submit(request("d"))
    waiting[0].cancel()  # a cancelled waiting job gives its place back at once
    assert scheduler.queue_depth == 1
    later = scheduler.submit(request("e"))
    engine.release(100)
    for job in (running, waiting[1], later):
        await collect(job)
    assert engine.started == ["a", "c", "e"]  # first come, first served; the cancelled one never ran
    scheduler.close()


async def test_cancelling_a_running_job_closes_its_generator():
    engine = ScriptedEngine()
    scheduler = Scheduler(engine, max_in_flight=1, max_queue=0)
    job = scheduler.submit(request(tokens=8))
    engine.release(1)
    await job.started()
    assert await job.__aiter__().__anext__() == "t0 "
    job.cancel()
    engine.release(1)  # the worker notices at its next token
    assert await asyncio.to_thread(engine.closed.wait, 10)
    assert engine.yielded == 2
    await asyncio.to_thread(wait_for, lambda: scheduler.in_flight == 0)
    scheduler.close()


async def test_a_bad_request_fails_at_started():
    scheduler = Scheduler(ScriptedEngine(), max_in_flight=1, max_queue=0)
    job = scheduler.submit(request("too long"))
    with pytest.raises(ContextWindowError):
        await job.started()
    scheduler.close()


async def test_close_fails_the_waiting_jobs_as_overloaded():
    engine = ScriptedEngine()
    scheduler = Scheduler(engine, max_in_flight=1, max_queue=1)
    running = scheduler.submit(request("a", tokens=1))
    waiting = scheduler.submit(request("b"))
    await running.started()
    engine.release(1)
    await collect(running)
    # The worker may already have taken the waiting job; hold it so close() finds it either running or waiting.
    await asyncio.to_thread(scheduler.close, 0.1)
    if engine.started == ["a"]:
        with pytest.raises(OverloadedError):
            await waiting.started()
    with pytest.raises(OverloadedError):
        scheduler.submit(request("c"))
    engine.release(100)


# ---- through HTTP -----------------------------------------------------------------------------------------------

def body(text: str = "hello", tokens: int = 3, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "stream": stream}


def chat_url(server) -> str:
    return f"{server.url}/v1/chat/completions"


def metric(server, name: str, **labels: str) -> float:
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(wanted + " ")), 0.0)


def test_a_client_leaving_mid_stream_stops_generation_and_frees_the_slot(scripted_server):
    engine, server = scripted_server(max_in_flight=1, max_queue=0)
    with httpx.Client(timeout=10) as client, client.stream("POST", chat_url(server), json=body(tokens=8, stream=True)) \
            as response:
        engine.release(1)
        for line in response.iter_lines():
            if "t0 " in line:
                break
    wait_for(lambda: metric(server, "prophet_rag_requests_total", endpoint="/v1/chat/completions",
                            status="499") == 1)
    engine.release(1)  # the worker notices at its next token, and closes the generator
    assert engine.closed.wait(10) and engine.yielded == 2
    wait_for(lambda: metric(server, "prophet_rag_requests_in_flight") == 0)
    engine.release(3)
    assert httpx.post(chat_url(server), json=body(tokens=3), timeout=10).json()["choices"][0]["message"]["content"] \
        == "t0 t1 t2 "


def test_a_client_leaving_while_queued_gives_its_place_back(scripted_server):
    engine, server = scripted_server(max_in_flight=1, max_queue=1)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, chat_url(server), json=body("first", tokens=2), timeout=10)
        wait_for(lambda: engine.started == ["first"])
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(chat_url(server), json=body("second"), timeout=0.5)
        wait_for(lambda: metric(server, "prophet_rag_queue_depth") == 0)
        engine.release(2)
        assert first.result().status_code == 200
    assert engine.started == ["first"]


def test_overload_is_a_503_with_retry_after(scripted_server):
    engine, server = scripted_server(max_in_flight=1, max_queue=1, retry_after_s=7)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, chat_url(server), json=body("a", tokens=1), timeout=10)
        wait_for(lambda: engine.started == ["a"])
        waiting = pool.submit(httpx.post, chat_url(server), json=body("b", tokens=1), timeout=10)
        wait_for(lambda: metric(server, "prophet_rag_queue_depth") == 1)
        refused = httpx.post(chat_url(server), json=body("c"), timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
        assert refused.json()["error"]["code"] == "overloaded"
        engine.release(2)
        assert running.result().status_code == waiting.result().status_code == 200


def test_waiting_past_the_queue_timeout_is_a_503(scripted_server):
    engine, server = scripted_server(max_in_flight=1, max_queue=1, queue_timeout_s=0.3)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, chat_url(server), json=body("a", tokens=1), timeout=10)
        wait_for(lambda: engine.started == ["a"])
        late = httpx.post(chat_url(server), json=body("b"), timeout=10)
        assert late.status_code == 503 and "waited" in late.json()["error"]["message"]
        engine.release(1)
        assert running.result().status_code == 200
    assert engine.started == ["a"]


def test_running_past_the_request_timeout_is_a_504_and_stops_the_job(scripted_server):
    engine, server = scripted_server(request_timeout_s=0.3)
    response = httpx.post(chat_url(server), json=body(tokens=5), timeout=10)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    engine.release(1)
    assert engine.closed.wait(10)


def test_a_stream_past_the_request_timeout_ends_with_an_error_event(scripted_server):
    engine, server = scripted_server(request_timeout_s=0.3)
    with httpx.stream("POST", chat_url(server), json=body(tokens=5, stream=True), timeout=10) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200 and '"code":"timeout"' in events[-1] and "[DONE]" not in events[-1]
    engine.release(1)
    assert engine.closed.wait(10)


def test_an_engine_refusal_is_a_400_even_for_a_stream(scripted_server):
    _, server = scripted_server()
    response = httpx.post(chat_url(server), json=body("too long", stream=True), timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
