"""Continuous batching in the engine: concurrent requests decoded together answer exactly as they do one by one,
join and leave between steps, can be cancelled, and are bounded (issue 21)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from prophet_rag.compute import batcher as batcher_module
from prophet_rag.compute.generate import Decoding
from prophet_rag.compute.prefill import prefill_full
from prophet_rag.config import BatchConfig, GenerationConfig, SelectionConfig
from prophet_rag.errors import InvalidRequestError, OverloadedError
from prophet_rag.selection.request import Selection
from tiny import CHUNKS, QUERY, ForcedToken

QUESTIONS = (QUERY, "Which city is the capital of France?", "What jumps over the lazy dog?", "Who is Beta?")
NO_EOS = (10**6,)  # an id no tiny model emits: every request runs to its own budget


def _request(i: int) -> tuple[list[str], str, GenerationConfig]:
    """Request i: its own documents, question and budget, so requests differ in length and finish apart."""
    chunks = [CHUNKS[(i + j) % len(CHUNKS)] for j in range(1 + i % 3)]
    return chunks, QUESTIONS[i % len(QUESTIONS)], GenerationConfig(max_new_tokens=2 + (i * 5) % 11,
                                                                    eos_token_ids=NO_EOS)


def _answer(engine, i: int, **generation):
    chunks, question, config = _request(i)
    if generation:
        config = GenerationConfig(**{**config.__dict__, **generation})
    return engine.answer(chunks, question, generation=config)


def _together(engine, count: int, **generation):
    """`count` requests from as many threads at once; their answers in request order."""
    start = threading.Barrier(count)

    def run(i):
        start.wait()
        return _answer(engine, i, **generation)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("family, batch_prefills", [("llama", True), ("qwen2", True), ("llama", False)])
def test_concurrent_requests_get_the_tokens_they_get_one_by_one(make_engine, family, batch_prefills):
    engine = make_engine(family, batch=BatchConfig(batch_prefills=batch_prefills))
    serial = [_answer(engine, i).token_ids for i in range(12)]
    before = engine.batcher.stats()
    together = [answer.token_ids for answer in _together(engine, 12)]
    assert together == serial
    after = engine.batcher.stats()
    steps, rows = after.steps - before.steps, after.rows - before.rows
    assert rows > steps  # some steps decoded several requests at once


@pytest.mark.parametrize("method", ["prophet_focus", "prophet", "cacheblend"])
def test_prefills_arriving_together_run_their_passes_in_shared_steps(make_engine, method):
    engine = make_engine("llama", selection=SelectionConfig(method=method))
    serial = [_answer(engine, i).token_ids for i in range(8)]
    before = engine.batcher.stats()
    assert [answer.token_ids for answer in _together(engine, 8)] == serial
    after = engine.batcher.stats()
    passes, steps = after.passes - before.passes, after.pass_steps - before.pass_steps
    assert passes >= 8 and passes > steps  # every prefill's passes went through the steps, several per step


def test_a_prefills_two_stage1_passes_go_through_one_step_in_their_order(make_engine, monkeypatch):
    """`prophet_focus` scoring both layouts at once hands the batcher two passes over one cache, the second placing
    each layer after the first has read it: batched with other requests' passes, the answers stay the serial ones."""
    monkeypatch.setattr(Selection, "plain_likely", property(lambda self: True))
    engine = make_engine("llama", selection=SelectionConfig(method="prophet_focus"))
    serial = [_answer(engine, i).token_ids for i in range(8)]
    before = engine.batcher.stats()
    assert [answer.token_ids for answer in _together(engine, 8)] == serial
    after = engine.batcher.stats()
    assert after.passes - before.passes == 3 * 8  # two Stage I passes and the selective forward each
    assert after.pass_steps - before.pass_steps < 2 * 8


def test_a_request_alone_runs_its_passes_and_decode_steps_on_its_own_thread(make_engine, monkeypatch):
    engine = make_engine("llama")
    real, threads = batcher_module.forward_passes, []

    def recorded(adapter, passes, **options):
        threads.append(threading.current_thread().name)
        return real(adapter, passes, **options)

    monkeypatch.setattr(batcher_module, "forward_passes", recorded)
    _answer(engine, 4)
    stats = engine.batcher.stats()
    assert stats.passes == stats.pass_steps == 2  # Stage I and the selective forward, each in a call of its own
    # No hand-off to the batcher's thread: one torch thread pool stays in use (see DecodeBatcher._alone).
    assert len(threads) > 2 and set(threads) == {threading.current_thread().name}
    assert stats.steps == len(threads) - 2 and stats.rows == stats.steps


def test_a_request_decoding_alone_joins_the_batch_when_another_comes(make_engine):
    engine = make_engine("llama")
    serial = [_answer(engine, i, max_new_tokens=24).token_ids for i in range(2)]
    chunks, question, config = _request(0)
    first = engine.stream(chunks, question, generation=GenerationConfig(**{**config.__dict__, "max_new_tokens": 24}))
    tokens = iter(first)
    next(tokens), next(tokens)  # decoding alone, on this thread
    assert engine.batcher.stats().running == 1
    before = engine.batcher.stats()
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(_answer, engine, 1, max_new_tokens=24)
        _wait_until(lambda: engine.batcher.stats().running == 2)
        for _ in tokens:  # the rest of the first, batched with the second from its next step
            pass
        assert [first.answer.token_ids, second.result().token_ids] == serial
    after = engine.batcher.stats()
    assert after.rows - before.rows > after.steps - before.steps  # some steps decoded both
    assert after.running == 0 and after.admitted == 0


def test_without_batch_prefills_no_pass_goes_through_the_steps(make_engine):
    engine = make_engine("llama", batch=BatchConfig(batch_prefills=False))
    _together(engine, 4)
    assert engine.batcher.stats().passes == 0 and engine.batcher.stats().steps > 0


def test_short_requests_leave_while_long_ones_go_on(make_engine):
    engine = make_engine("llama")
    answers = _together(engine, 6)
    budgets = [_request(i)[2].max_new_tokens for i in range(6)]
    assert [len(a.token_ids) for a in answers] == budgets and len(set(budgets)) > 1
    assert engine.batcher.stats().admitted == 0 and engine.batcher.stats().running == 0


def test_a_prefill_takes_its_turn_between_the_decode_steps_of_a_running_request(make_engine, monkeypatch):
    engine = make_engine("llama")
    real = batcher_module.forward_passes

    def slow(*args, **kwargs):  # 400 steps of the long request take >= 2 s
        time.sleep(0.005)
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "forward_passes", slow)
    _decoding_in_the_background(monkeypatch)
    chunks, question, generation = _request(0)
    expected = engine.answer(chunks, question, generation=generation).token_ids
    long = iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=400,
                                                                            eos_token_ids=NO_EOS)))
    next(long)
    assert engine.answer(chunks, question, generation=generation).token_ids == expected
    assert engine.batcher.stats().running == 1  # the long request is still decoding: it did not hold the engine
    long.close()


def _decoding_in_the_background(monkeypatch) -> None:
    """A request decodes on the batcher's thread even when alone, as it does beside others: the tests of how steps
    are shared need one decoding in the background while the test's thread starts another (a request alone
    otherwise decodes on its consumer's thread, as fast as it is read)."""
    monkeypatch.setattr(batcher_module.DecodeBatcher, "_alone", lambda self: False)


def _steps_of_a_prefill_while_decoding(engine, monkeypatch):
    """Request 0 answered while a long request decodes; its tokens, and (decode rows, passes) of every step run
    meanwhile."""
    _decoding_in_the_background(monkeypatch)
    chunks, question, generation = _request(0)
    steps, real = [], batcher_module.DecodeBatcher._step

    def recorded(self, batch, passes):
        steps.append((len(batch), len(passes)))
        return real(self, batch, passes)

    long = iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=400,
                                                                            eos_token_ids=NO_EOS)))
    next(long)
    monkeypatch.setattr(batcher_module.DecodeBatcher, "_step", recorded)
    tokens = engine.answer(chunks, question, generation=generation).token_ids
    monkeypatch.undo()
    assert engine.batcher.stats().running == 1  # the long request was decoding all along
    long.close()
    return tokens, steps


@pytest.mark.parametrize("priority, decode_rows", [(8, [0, 0]), (1, [0, 1]), (0, [1, 1])])
def test_a_prefill_arriving_during_decoding_runs_its_passes_before_the_decode_steps(make_engine, monkeypatch,
                                                                                     priority, decode_rows):
    # Its Stage I pass, then its selective forward: each in a step without the decode rows, as long as the
    # decode steps have not been put off `prefill_priority` times in a row; nothing in between. ProphetKV, whose
    # prefill is always these two passes (the default may run a second Stage I when it keeps ProphetKV's plan).
    engine = make_engine("llama", batch=BatchConfig(prefill_priority=priority),
                         selection=SelectionConfig(method="prophet"))
    chunks, question, generation = _request(0)
    expected = engine.answer(chunks, question, generation=generation).token_ids
    tokens, steps = _steps_of_a_prefill_while_decoding(engine, monkeypatch)
    assert tokens == expected
    with_passes = [i for i, (_, passes) in enumerate(steps) if passes]
    assert [steps[i][0] for i in with_passes] == decode_rows
    if priority:
        assert with_passes[1] == with_passes[0] + 1  # its turns under the lock went before the next decode step


def test_prefill_priority_is_checked_where_it_is_built():
    with pytest.raises(InvalidRequestError, match="prefill_priority"):
        BatchConfig(prefill_priority=-1)


def test_a_request_whose_part_of_a_step_fails_fails_alone(make_engine, monkeypatch):
    # A stored block that cannot be read (its cache's layer_ready raises) in a step shared with other requests: the
    # others get the tokens they get one by one.
    engine = make_engine("llama")
    serial = [_answer(engine, i).token_ids for i in range(4)]
    real = batcher_module.DecodeBatcher._decode

    def unreadable(layer):
        if len(engine.batcher._stepping) > 1:
            raise RuntimeError("block read failed")

    def decode(self, admission, cache, logits, state):
        cache.layer_ready = unreadable
        return real(self, admission, cache, logits, state)

    chunks, question, _ = _request(0)
    _decoding_in_the_background(monkeypatch)
    monkeypatch.setattr(batcher_module.DecodeBatcher, "_decode", decode)
    failing = iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=400,
                                                                               eos_token_ids=NO_EOS)))
    next(failing)
    monkeypatch.undo()
    assert [answer.token_ids for answer in _together(engine, 4)] == serial
    with pytest.raises(RuntimeError, match="block read failed"):
        for _ in failing:
            pass
    _wait_until(lambda: engine.batcher.stats().admitted == 0)


def test_seeded_sampling_is_reproducible_per_request_in_a_batch(make_engine):
    engine = make_engine("llama")
    sampled = {"temperature": 1.0, "top_k": 20}
    serial = [_answer(engine, i, seed=100 + i, **sampled).token_ids for i in range(8)]
    start = threading.Barrier(8)

    def run(i):
        start.wait()
        return _answer(engine, i, seed=100 + i, **sampled).token_ids

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, range(8))) == serial
    assert len(set(serial)) > 1


def test_stop_strings_end_a_request_inside_a_batch_as_they_do_alone(make_engine):
    engine = make_engine("llama")
    alone = _answer(engine, 3)
    stop = alone.text[len(alone.text) // 2 :][:2]
    assert stop.strip()
    expected = _answer(engine, 3, stop=(stop,))
    assert len(expected.token_ids) < len(alone.token_ids)
    answers = _together(engine, 6, stop=(stop,))
    assert answers[3].token_ids == expected.token_ids and answers[3].text == expected.text


def test_a_closed_stream_leaves_the_batch_and_frees_its_place(make_engine):
    engine = make_engine("llama", batch=BatchConfig(max_batch=2))
    chunks, question, _ = _request(0)
    stream = engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=200, eos_token_ids=NO_EOS))
    deltas = iter(stream)
    next(deltas)
    assert engine.batcher.stats().admitted == 1
    deltas.close()
    _wait_until(lambda: engine.batcher.stats().admitted == 0)
    assert engine.batcher.stats().rows < 200  # it did not run to its budget


def test_a_stream_dropped_midway_frees_its_place(make_engine):
    engine = make_engine("llama", batch=BatchConfig(max_batch=1, max_waiting=0))
    chunks, question, generation = _request(2)
    next(iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=200,
                                                                          eos_token_ids=NO_EOS))))
    _wait_until(lambda: engine.batcher.stats().admitted == 0)
    assert len(engine.answer(chunks, question, generation=generation).token_ids) == generation.max_new_tokens


def test_a_cancelled_request_leaves_the_others_untouched(make_engine):
    engine = make_engine("llama")
    expected = _answer(engine, 4).token_ids
    chunks, question, _ = _request(1)
    stream = iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=200,
                                                                              eos_token_ids=NO_EOS)))
    next(stream)
    other: list = []
    thread = threading.Thread(target=lambda: other.append(_answer(engine, 4).token_ids))
    thread.start()
    _wait_until(lambda: engine.batcher.stats().running == 2)  # both decoding together
    stream.close()
    thread.join(60)
    assert other == [expected]
    _wait_until(lambda: engine.batcher.stats().admitted == 0)


def test_a_full_engine_with_no_waiting_room_refuses_with_overloaded(make_engine):
    engine = make_engine("llama", batch=BatchConfig(max_batch=1, max_waiting=0))
    chunks, question, generation = _request(0)
    held = iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=50,
                                                                            eos_token_ids=NO_EOS)))
    next(held)
    with pytest.raises(OverloadedError, match="max_batch"):
        engine.answer(chunks, question, generation=generation)
    held.close()
    _wait_until(lambda: engine.batcher.stats().admitted == 0)  # freed after the step under way, if any
    assert len(engine.answer(chunks, question, generation=generation).token_ids) == generation.max_new_tokens


def test_requests_one_after_another_always_find_the_place_free(make_engine):
    # The batcher lets a finished request's place go before handing over its last token, so a caller that starts
    # its next request at once is never refused, even with no waiting room.
    engine = make_engine("llama", batch=BatchConfig(max_batch=1, max_waiting=0))
    for i in range(20):
        assert _answer(engine, i).token_ids


def test_a_waiting_request_runs_once_a_place_frees(make_engine):
    engine = make_engine("llama", batch=BatchConfig(max_batch=1, max_waiting=1))
    chunks, question, generation = _request(0)
    expected = engine.answer(chunks, question, generation=generation).token_ids
    held = iter(engine.stream(chunks, question, generation=GenerationConfig(max_new_tokens=50,
                                                                            eos_token_ids=NO_EOS)))
    next(held)
    waiter: list = []
    thread = threading.Thread(target=lambda: waiter.append(engine.answer(chunks, question,
                                                                         generation=generation).token_ids))
    thread.start()
    _wait_until(lambda: engine.batcher.stats().waiting == 1)
    with pytest.raises(OverloadedError):  # the one place in line is taken
        engine.answer(chunks, question, generation=generation)
    assert not waiter
    held.close()
    thread.join(60)
    assert waiter == [expected]


def test_a_failed_step_fails_its_requests_and_frees_their_places(make_engine, monkeypatch):
    engine = make_engine("llama")

    def broken(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(batcher_module, "forward_passes", broken)
    with pytest.raises(RuntimeError, match="step failed"):
        _answer(engine, 2)
    _wait_until(lambda: engine.batcher.stats().admitted == 0)
    monkeypatch.undo()
    assert len(_answer(engine, 2).token_ids) == _request(2)[2].max_new_tokens


def test_each_batched_request_keeps_its_own_constraint(make_engine):
    engine = make_engine("llama")
    runs = []
    for i, steps in enumerate((2, 5)):
        layout = engine.builder.layout(CHUNKS[: i + 1], QUESTIONS[i])
        ids = layout.joined_ids()
        cache, hidden = prefill_full(engine.adapter, ids, int(layout.prefix_ids.numel()), ids.numel() + 8,
                                     torch.float32)
        with torch.inference_mode():
            logits = engine.adapter.logits(hidden[-1:])[0]
        constraint = ForcedToken(int(torch.argmin(logits)), steps)
        admission = engine.batcher.admit()
        state = Decoding(GenerationConfig(max_new_tokens=8), NO_EOS, constraint)
        runs.append((admission, admission.decode(cache, logits, state), constraint))
    firsts = [next(tokens) for _, tokens, _ in runs]  # both requests join the batch
    for (admission, tokens, constraint), first in zip(runs, firsts, strict=True):
        with admission:
            assert [first, *tokens] == [constraint.token] * constraint.steps
        assert constraint.masked == constraint.steps  # one mask per token, none after the grammar ended
    _wait_until(lambda: engine.batcher.stats().admitted == 0)


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("max_batch", 1.5), ("max_waiting", -1),
                                          ("max_waiting", True), ("batch_prefills", 1)])
def test_batch_config_is_checked_where_it_is_built(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        BatchConfig(**{field: value})
