"""langchain-tests' standard unit suite for ChatGPT2, configured for what a GPT-2 can do.

Skipped standard tests, and why:
- test_bind_tool_pydantic, test_with_structured_output: no tool calling and no structured
  output (`has_tool_calling` / `has_structured_output` are False; both raise NotImplementedError).
- test_init_from_env, test_serdes: a local model has no API key or environment settings to read,
  and is not serialisable (it holds a loaded model).
- test_bind_tool_pydantic and test_with_structured_output pass trivially (the suite checks
  nothing when the features are declared absent); our own tests check the NotImplementedError.
"""

from langchain_tests.unit_tests import ChatModelUnitTests

from adapters.langchain_gpt2 import ChatGPT2
from chatbot.generation import DEFAULT_MODEL


class GPT2Capabilities:
    """What ChatGPT2 declares to the standard suites: text in, text out, token usage, nothing more."""

    @property
    def chat_model_class(self):
        return ChatGPT2

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supports_model_override(self):
        return False


class TestChatGPT2Unit(GPT2Capabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self):
        return {"model": str(DEFAULT_MODEL), "device": "cpu"}

    @property
    def standard_chat_model_params(self):
        params = super().standard_chat_model_params
        params.pop("api_key", None)  # a local model has no API key
        return params
