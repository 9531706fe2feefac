"""langchain-tests' standard integration suite for ChatGPT2 on the shipped model.

Configured honestly for a small GPT-2. The suite skips these standard tests, for these reasons:
- no tool calling (`has_tool_calling` False; `bind_tools` raises NotImplementedError): test_agent_loop,
  test_bind_runnables_as_tools, test_tool_calling, test_tool_calling_async,
  test_tool_calling_with_no_arguments, test_tool_choice, test_tool_message_error_status,
  test_tool_message_histories_list_content, test_tool_message_histories_string_content,
  test_structured_few_shot_examples, test_unicode_tool_call_integration;
- no structured output or JSON mode (`with_structured_output` raises NotImplementedError):
  test_structured_output, test_structured_output_async, test_structured_output_optional_param,
  test_structured_output_pydantic_2_v1, test_json_mode;
- text only, no images, audio, PDFs or provider-specific blocks: test_image_inputs,
  test_image_tool_message, test_pdf_inputs, test_pdf_tool_message, test_audio_inputs,
  test_anthropic_inputs;
- one instance serves one loaded model, so a per-call `model` cannot switch it
  (`supports_model_override` False): test_invoke_with_model_override,
  test_ainvoke_with_model_override, test_stream_with_model_override,
  test_astream_with_model_override;
- test_stream_time: a VCR-recorded timing test for network models (no VCR cassette here).
"""

from langchain_tests.integration_tests import ChatModelIntegrationTests

from chatbot.generation import DEFAULT_MODEL

from ..unit.test_langchain_standard import GPT2Capabilities


class TestChatGPT2Integration(GPT2Capabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self):
        return {"model": str(DEFAULT_MODEL), "device": "cpu", "seed": 0}
