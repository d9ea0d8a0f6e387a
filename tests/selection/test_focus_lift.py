"""`prophet_focus` when the question's words match a chunk but its attention does not go there (`Selection.lift`
under `FOCUS_LIFT`): plain ProphetKV, as when the anchors are spread."""

from __future__ import annotations

import pytest
import torch
from focus_plans import planned

from prophet_rag.config import SelectionConfig
from prophet_rag.selection.request import Selection
from prophet_rag.selection.signals import FOCUS_LIFT, anchor_lift, anchor_mask, anchored_weights
from tiny import CHUNKS, FILLERS, QUERY


def test_anchor_mask_marks_the_questions_words_found_in_few_chunks():
    chunks = [torch.tensor([1, 2]), torch.tensor([2, 3]), torch.tensor([2, 4]), torch.tensor([2, 5])]
    query = torch.tensor([2, 3, 9])  # 2 is in every chunk (shared phrasing), 3 in one, 9 in none
    assert anchor_mask(chunks, query).tolist() == [False, False, False, True, False, False, False, False]


def test_a_chunks_first_token_is_never_an_anchor():
    # In the parallel geometry every chunk's first token follows the shared sink, where attention may pile up.
    chunks = [torch.tensor([3, 1]), torch.tensor([4, 2]), torch.tensor([5, 6]), torch.tensor([6, 7])]
    query = torch.tensor([3, 2, 5])
    assert anchor_mask(chunks, query).tolist() == [False, False, False, True, False, False, False, False]


def test_anchored_weights_give_a_chunks_first_token_nothing_whatever_its_attention():
    chunks = [torch.tensor([3, 1, 3]), torch.tensor([4, 2])]
    mass = torch.tensor([100.0, 1.0, 2.0, 1.0, 1.0])
    weights = anchored_weights(chunks, torch.tensor([3]), mass)
    idf = float(torch.log(torch.tensor(3 / 1.5)))  # token 3 is in one chunk of two
    assert weights.tolist() == pytest.approx([0.0, 0.0, 2.0 * idf, 0.0, 0.0])


def test_a_first_token_sink_does_not_make_its_chunk_the_focus():
    # Musique-62 on Qwen2.5-0.5B: 15% of the question's attention on a passage's first token, a question word.
    chunks = [torch.tensor([9, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])]
    request = Selection(None, SelectionConfig(method="prophet_focus"), chunks, torch.tensor([9, 4]))
    request.parallel = torch.tensor([50.0, 1, 1, 1, 3, 1, 1, 1, 1])
    assert request.anchored.tolist()[0] == 0 and int(torch.argmax(request.anchored)) == 1


def test_anchor_lift_is_the_anchors_mean_mass_over_the_contexts():
    mass = torch.tensor([1.0, 1.0, 4.0, 2.0])  # mean 2
    assert anchor_lift(mass, torch.tensor([False, False, True, False])) == pytest.approx(2.0)
    assert anchor_lift(mass, torch.tensor([True, True, False, False])) == pytest.approx(0.5)


def test_anchor_lift_without_anchors_is_zero():
    assert anchor_lift(torch.ones(4), torch.zeros(4, dtype=torch.bool)) == 0.0


def test_lift_reads_the_best_anchored_chunks_anchors_only():
    chunks = [torch.tensor([7, 8]), torch.tensor([6, 5]), torch.tensor([9, 8])]
    request = Selection(None, SelectionConfig(method="prophet_focus"), chunks, torch.tensor([5, 8]))
    request.parallel = torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0, 5.0])  # mean 2; chunk 1's anchor (token 5) has 3
    request.__dict__["anchored"] = torch.tensor([0.1, 1.0, 0.2])
    assert request.lift == pytest.approx(1.5)


def _instructed(instruction: list[int] | None) -> Selection:
    """Chunk 1 holds two of the question's words: 5 (also in the instruction) with a lift of 3, 6 with 1.5."""
    chunks = [torch.tensor([7, 8, 9]), torch.tensor([4, 5, 6]), torch.tensor([9, 8, 7])]
    ids = None if instruction is None else torch.tensor(instruction)
    request = Selection(None, SelectionConfig(method="prophet_focus"), chunks, torch.tensor([5, 6]), ids)
    request.parallel = torch.tensor([2.0, 2.0, 2.0, 2.0, 6.0, 3.0, 2.0, 2.0, 1.0])  # mean 2.4444
    return request


def test_without_an_instruction_the_lift_reads_every_anchor():
    assert _instructed(None).lift == pytest.approx(4.5 / (22 / 9))


def test_the_instructions_words_lift_no_move_of_their_own():
    # The lift of the anchors the instruction does not hold (token 6) caps the lift of them all.
    assert _instructed([1, 5, 2]).lift == pytest.approx(3.0 / (22 / 9))
    assert _instructed([11, 12]).lift == pytest.approx(4.5 / (22 / 9))


def test_anchors_that_are_all_the_instructions_mean_plain_prophetkv():
    request = _instructed([5, 6])
    assert request.lift == 0.0
    assert not request.spread and request.plain


def _selection(lift: float) -> Selection:
    """A request whose anchors single out one chunk of ten (not spread), with the given `lift`."""
    chunks = [torch.tensor([i]) for i in range(10)]
    request = Selection(None, SelectionConfig(method="prophet_focus", ratio=0.2), chunks, torch.tensor([0]))
    request.__dict__["anchored"] = torch.tensor([1.0] + [0.0] * 9)
    request.__dict__["lift"] = lift
    return request


@pytest.mark.parametrize("lift,plain", [(0.0, True), (0.5, True), (FOCUS_LIFT, False), (2.0, False)])
def test_plain_when_the_lift_is_under_focus_lift(lift, plain):
    request = _selection(lift)
    assert not request.spread
    assert request.plain is plain


def _one_anchor(engine, chunks, best):
    sizes = [int(ids.numel()) for ids in engine.builder.layout(list(chunks), QUERY).chunk_ids]
    weights = torch.zeros(sum(sizes))
    weights[sum(sizes[:best])] = 1.0
    return weights


def test_a_single_focus_chunk_the_attention_does_not_confirm_stays_in_place(make_engine):
    engine = make_engine("llama")
    chunks = (*CHUNKS, *FILLERS)
    anchored = _one_anchor(engine, chunks, 1)
    order, _, chosen, prophet = planned(engine, chunks, 0.3, anchored_tokens=anchored, lift=0.3)
    assert order == list(range(len(chunks)))
    assert torch.equal(chosen, prophet)


def test_a_confirmed_focus_chunk_still_moves(make_engine):
    engine = make_engine("llama")
    chunks = (*CHUNKS, *FILLERS)
    order, _, _, _ = planned(engine, chunks, 0.3, anchored_tokens=_one_anchor(engine, chunks, 1),
                            lift=FOCUS_LIFT * 2)
    assert order[-1] == 1


def _instructions_seen(engine, monkeypatch, call):
    import prophet_rag.engine.pipeline as pipeline

    seen = []

    class Spy(Selection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.instruction_ids)

    monkeypatch.setattr(pipeline, "Selection", Spy)
    call()
    return seen


def test_the_engine_gives_selection_its_fixed_prefix_as_the_instruction(make_engine, monkeypatch):
    engine = make_engine("llama")
    seen = _instructions_seen(engine, monkeypatch, lambda: engine.answer(list(CHUNKS), QUERY))
    assert len(seen) == 1 and torch.equal(seen[0], engine.builder.layout(list(CHUNKS), QUERY).prefix_ids)


def test_a_conversations_history_is_no_instruction(make_engine, monkeypatch):
    from prophet_rag.layout import DOCUMENTS

    engine = make_engine("llama")
    messages = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": ["Context:\n", DOCUMENTS, f"\nQuestion: {QUERY}"]}]
    seen = _instructions_seen(engine, monkeypatch, lambda: engine.chat(messages, list(CHUNKS)))
    assert seen == [None]
