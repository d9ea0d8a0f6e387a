"""The framework-free parts of the adapters: finding registered node texts in a joined context, placing documents
in a rendered template, and finding known documents in a rendered prompt."""

from __future__ import annotations

from prophet_rag.integrations.placement import Marks, locate, occurrences
from prophet_rag.integrations.registry import ChunkRegistry
from prophet_rag.layout import DOCUMENTS


def test_segment_finds_registered_texts_joined_by_blank_lines_or_newlines():
    registry = ChunkRegistry()
    for text in ("  header\n\nbody one  ", "body two"):
        registry.add(text)
    assert registry.segment("header\n\nbody one\n\nbody two") == [("header\n\nbody one", True), ("body two", True)]
    assert registry.segment("header\n\nbody one\nbody two") == [("header\n\nbody one", True), ("body two", True)]


def test_unregistered_lines_between_nodes_merge_into_one_fragment():
    registry = ChunkRegistry()
    registry.add("node")
    assert registry.segment("a\n\nb\nnode\n\n\n\nc") == [("a\n\nb", False), ("node", True), ("c", False)]


def test_registry_forgets_the_oldest_text_past_its_bound():
    registry = ChunkRegistry(max_entries=2)
    for text in ("one\n\n1", "two", "three\n\n3"):
        registry.add(text)
    assert len(registry) == 2 and "one\n\n1" not in registry and "three\n\n3" in registry
    assert registry.segment("one\n\n1\n\nthree\n\n3") == [("one\n\n1", False), ("three\n\n3", True)]


def test_marks_place_documents_and_fill_the_other_variables_back():
    marks = Marks({"context_str": "joined", "query_str": "Why?", "history": [1]}, "context_str")
    assert marks.args["history"] == [1] and "Why?" not in marks.args.values()
    rendered = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Notes:\n{marks.args['context_str']}\n\nQ: {marks.args['query_str']}"}]
    request = marks.request(rendered, ["a", "b"])
    assert request.messages == ({"role": "system", "content": "Be brief."},
                                {"role": "user", "content": ["Notes:\n", DOCUMENTS, "Q: Why?"]})
    assert (request.documents, request.transient_prefix) == (("a", "b"), False)


def test_a_variable_before_the_documents_makes_the_prefix_one_off():
    marks = Marks({"context_str": "x", "query_str": "Why?"}, "context_str")
    request = marks.request([{"role": "user", "content": f"{marks.args['query_str']} {marks.args['context_str']}"}],
                            ["a"])
    assert request.transient_prefix and request.messages[0]["content"] == ["Why? ", DOCUMENTS, ""]


def test_a_context_rendered_twice_or_never_cannot_be_placed():
    marks = Marks({"context_str": "x"}, "context_str")
    twice = f"{marks.args['context_str']} {marks.args['context_str']}"
    assert marks.request([{"role": "user", "content": twice}], ["a"]) is None
    assert marks.request([{"role": "user", "content": "no context"}], ["a"]) is None


# ---- locate: known documents in a rendered prompt -----------------------------------------------------------------


def test_occurrences_are_exact_whole_and_leftmost_longest():
    assert occurrences("Notes: cat and cats; category", ["cat"]) == [(7, 10)]  # never inside a word
    assert occurrences("ab abc", ["ab", "abc", "b"]) == [(0, 2), (3, 6)]
    assert occurrences("x  doc one  y", ["  doc one  ", ""]) == [(3, 10)]  # stripped; blank texts ignored
    assert occurrences("(doc)", ["doc"]) == [(1, 4)]  # punctuation is an edge


def test_locate_cuts_the_message_that_holds_the_documents():
    messages = [{"role": "system", "content": "Use these notes:\n\nA one.\n\nB two.\n\nThat is all."},
                {"role": "user", "content": "Why?"}]
    request = locate(messages, ["B two.", "A one.", "C three."], per_call=["Why?"])
    assert request.messages == ({"role": "system", "content": ["Use these notes:\n\n", DOCUMENTS, "That is all."]},
                                {"role": "user", "content": "Why?"})
    assert (request.documents, request.transient, request.transient_prefix) == (("A one.", "B two."),
                                                                                (False, False), False)


def test_locate_keeps_text_between_documents_as_one_off_fragments():
    content = "Context: [1] A one.\n[2] B two.\nAnswer:"
    request = locate([{"role": "user", "content": content}], ["A one.", "B two."])
    assert request.messages[0]["content"] == ["Context: [1] ", DOCUMENTS, "Answer:"]
    assert (request.documents, request.transient) == (("A one.", "[2]", "B two."), (False, True, False))


def test_locate_makes_the_prefix_one_off_when_it_holds_per_call_text():
    content = "Question: Why? \nContext: A one. \nAnswer:"
    request = locate([{"role": "user", "content": content}], ["A one."], per_call=["Why?", "A one.", " "])
    assert request.transient_prefix and request.messages[0]["content"] == ["Question: Why? \nContext: ", DOCUMENTS,
                                                                           "Answer:"]


def test_locate_takes_the_message_with_most_document_text():
    messages = [{"role": "system", "content": "A one."}, {"role": "user", "content": "A one. B two."}]
    request = locate(messages, ["A one.", "B two."])
    assert request.messages[0] == {"role": "system", "content": "A one."} and request.documents == ("A one.",
                                                                                                    "B two.")


def test_locate_finds_nothing_in_a_prompt_without_the_documents():
    assert locate([{"role": "user", "content": "A ONE. B TWO."}], ["A one.", "B two."]) is None
    assert locate([{"role": "user", "content": "Anyone?"}], ["one"]) is None
