"""The framework-free parts of the adapters: finding registered node texts in a joined context, and placing
documents in a rendered template."""

from __future__ import annotations

from prophet_rag.integrations.placement import Marks
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
