"""LangChain's own standard test suites for chat models, run on ChatProphet over the embedded SmolLM2-135M.

Features the model does not have (tool calling, structured output, image/audio/PDF inputs) are declared through the
suite's own properties, which skip their tests; nothing is skipped by hand.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from prophet_rag.integrations.langchain import ChatProphet

pytestmark = pytest.mark.slow

_ENGINE = {}


@pytest.fixture(autouse=True)
def _engine(embedded_engine):
    # The suites build the model from `chat_model_params`, a property: it reads the session's engine from here.
    _ENGINE["engine"] = embedded_engine


class _Params:
    @property
    def chat_model_class(self) -> type[ChatProphet]:
        return ChatProphet

    @property
    def chat_model_params(self) -> dict:
        # Few new tokens keep the suite quick on a CPU; every answer is still non-empty text.
        return {"engine": _ENGINE["engine"], "max_new_tokens": 8}

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # bind_tools exists only to refuse with a clear error, which the suites would take for tool calling.
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False


class TestChatProphetUnit(_Params, ChatModelUnitTests):
    pass


class TestChatProphetIntegration(_Params, ChatModelIntegrationTests):
    pass
