"""LangChain faces of the engine: `GPT2LLM` (text completion), `ChatGPT2` (chat model) and
`ChatbotMessageHistory` (message history on the engine's memory store).

Both models run the project's `LocalGenerator`, so they get what the engine gets: real
batching on the model (left-padded), multi-token stop strings on every path, replies that
never contain the prompt, the repetition controls, and (unless ``safety=False``) the same
output filters: toxic text regenerated then replaced, personal data redacted, mass mentions
neutralised. Models are loaded once per (model, device) and shared by every instance.

    from adapters.langchain_gpt2 import GPT2LLM, ChatGPT2, ChatbotMessageHistory
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from functools import lru_cache
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from adapters.langchain_history import ChatbotMessageHistory, message_role, message_text
from chatbot.config import Settings
from chatbot.conversation import Turn, prompt_planner
from chatbot.decoding import ENGINE_ONLY, GENERATION_FIELDS, DecodingSettings, compose, seeded_for
from chatbot.engine import iterate_in_thread
from chatbot.errors import ChatbotError
from chatbot.generation import GenerationRequest, GenerationResult, prompt_budget, resolve_model
from chatbot.memory import MAX_TURN_CHARS
from chatbot.prompting import clean_speaker, get_persona
from chatbot.reply_policy import ReplyPolicy
from chatbot.safety import (
    break_special_tokens,
    neutralise_speaker_tags,
    normalise,
    output_chain,
)
from chatbot.sentence_encoder import BUNDLED_ENCODER

__all__ = ["GPT2LLM", "ChatGPT2", "ChatbotMessageHistory"]

_ALIASES = {"max_tokens": "max_new_tokens", "timeout": "max_time"}
"""LangChain's standard names for two decoding settings, as fields and per call."""


@lru_cache(maxsize=8)
def _shared_generator(model: str, device: str, allow_download: bool) -> Any:
    """One loaded model per (model, device) in the process, shared by every instance.

    `LocalGenerator` serialises its own use, so LangChain's thread pool (``ainvoke``,
    ``abatch`` with a concurrency limit) can call it from any thread.
    """
    from chatbot.generation import LocalGenerator

    return LocalGenerator.from_pretrained(model, device=device, allow_download=allow_download, option="`model`")


@lru_cache(maxsize=8)
def _shared_bank(generator: Any, sources: tuple[str, ...], candidates: int, encoder: str) -> Any:
    """One response bank per (model, sources, encoder) in the process, shared as the model is."""
    from chatbot.response_bank import banked

    return banked(generator, sources, candidates, encoder)


class _GPT2Mixin(BaseModel):
    """Fields and machinery shared by the LLM and the chat model."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = None
    """Model directory, or a hub name already cached; None means the shipped chit-chat model."""
    device: str = "auto"
    allow_download: bool = False
    preset: str = "balanced"
    """Decoding preset the fields below override."""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    bot_repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bot_no_repeat_ngram_size: int | None = None
    max_time: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    """LangChain's standard name for `max_new_tokens` (used when that is not set)."""
    timeout: float | None = None
    """LangChain's standard name for `max_time`, in seconds (used when that is not set)."""
    stop: list[str] | None = None
    """Stop strings for every call, on top of those a call passes."""
    max_retries: int = 0
    """Accepted because LangChain passes it to every model; a local model makes no network call to retry."""
    streaming: bool = False
    """When True, `invoke` streams internally and callbacks get every piece (`GPT2LLM`: one
    prompt after another, so a `batch` is no longer one batch on the model)."""
    safety: bool = True
    """Run the output filters (toxicity, personal data, mentions) on every result."""
    toxicity_threshold: float = Settings.model_fields["toxicity_threshold"].default
    unsafe_retries: int = Settings.model_fields["unsafe_retries"].default
    unsafe_fallback: str = Settings.model_fields["unsafe_fallback_reply"].default
    """What a reply that stayed toxic is replaced with (the engine's default)."""
    generator: Any = Field(default=None, exclude=True)
    """A ready `Generator` to use instead of loading ``model`` (tests, or sharing the engine's)."""

    _policy: ReplyPolicy = PrivateAttr()

    def _setup(self) -> None:
        settings = self.decoding()  # every value checked now, with the field named
        if self.generator is None:
            object.__setattr__(self, "generator",
                               _shared_generator(resolve_model(self.model), self.device, self.allow_download))
        self._checked_length(settings)
        self._policy = ReplyPolicy(output_chain(toxicity_threshold=self.toxicity_threshold) if self.safety else None,
                                   self.unsafe_retries)

    def decoding(self, **overrides: Any) -> DecodingSettings:
        """The preset with this instance's fields, then the call's ``overrides``, on top."""
        given = {name: getattr(self, name) for name in GENERATION_FIELDS if getattr(self, name) is not None}
        if self.max_tokens is not None:
            given.setdefault("max_new_tokens", self.max_tokens)
        if self.timeout is not None:
            given.setdefault("max_time", self.timeout)
        overrides = {k: v for k, v in overrides.items() if k != "model"}  # LangChain's per-call model name
        for alias, name in _ALIASES.items():
            if alias in overrides:
                value = overrides.pop(alias)
                overrides.setdefault(name, value)
        engine_only = sorted(set(overrides) & set(ENGINE_ONLY))
        if engine_only:
            raise ValueError(f"{', '.join(engine_only)}: the engine applies these to a conversation's earlier "
                             "replies; a LangChain model call has none, so they cannot be set here")
        known = [*GENERATION_FIELDS, *_ALIASES]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown keyword argument(s) {', '.join(unknown)}; decoding settings are "
                             f"{', '.join(known)}")
        try:
            return compose(self.preset, given, overrides)
        except ChatbotError as err:
            raise ValueError(str(err)) from None

    def _checked_length(self, settings: DecodingSettings) -> DecodingSettings:
        """``settings``, when its reply length leaves room for a prompt in the model's context."""
        try:
            prompt_budget(self.generator.context_size, settings)
        except ChatbotError as err:
            raise ValueError(str(err)) from None
        return settings

    def _stops(self, stop: list[str] | str | None) -> tuple[str, ...]:
        """This instance's stop strings, then the call's (one string is one stop, not its characters)."""
        if isinstance(stop, str):
            stop = [stop]
        return (*(self.stop or ()), *(stop or ()))

    def get_token_ids(self, text: str) -> list[int]:
        """The model's own token ids (LangChain's default would fetch GPT-2's tokenizer from the hub)."""
        return list(self.generator.encode(text))

    @property
    def _model_name(self) -> str:
        return str(getattr(self.generator, "name", resolve_model(self.model)))

    def _with_ls_params(self, params: LangSmithParams, stop: list[str] | None, kwargs: dict[str, Any]) -> LangSmithParams:
        """LangChain's tracing parameters: provider, model (a per-call ``model`` wins), temperature, limits, stops."""
        d = self.decoding(**kwargs)
        params.update(ls_provider="gpt2-chatbot", ls_model_name=str(kwargs.get("model", self._model_name)),
                      ls_temperature=d.temperature, ls_max_tokens=d.max_new_tokens)
        if stop or self.stop:
            params["ls_stop"] = list(self._stops(stop))
        return params

    def _params(self) -> dict[str, Any]:
        return {"model": self._model_name, "preset": self.preset, "safety": self.safety,
                **self.decoding().model_dump()}

    # -- generation with the filters ------------------------------------------------

    def _generate_checked(self, requests: list[GenerationRequest]) -> list[tuple[GenerationResult, str, tuple[str, ...]]]:
        """Results with their checked text and the filters' reasons, through the engine's reply
        policy (`ReplyPolicy.whole`, one batch on the model per round); a reply that stayed
        unsafe is replaced by ``unsafe_fallback``."""
        out = []
        for outcome in self._policy.whole(self.generator, requests):
            text = self.unsafe_fallback if outcome.finish == "unsafe" else outcome.text
            assert outcome.result is not None
            out.append((outcome.result, text, tuple(outcome.reasons)))
        return out

    def _stream_checked(self, request: GenerationRequest) -> Iterator[str]:
        """The reply policy's streamed reply (`ReplyPolicy.gated`): with the filters on, checked
        sentences; a blocked first sentence is generated again, then replaced by the fallback
        text; a later one ends the stream at the last safe sentence."""
        gated = self._policy.gated(self.generator, request)
        pieces = gated.pieces()
        try:
            yield from pieces
        finally:
            pieces.close()  # stops the model when the caller left early
        if gated.outcome is not None and gated.outcome.finish == "unsafe" and not gated.outcome.text:
            yield self.unsafe_fallback


# --------------------------------------------------------------------------- the LLM


class GPT2LLM(_GPT2Mixin, BaseLLM):
    """A GPT-2 text-completion model: ``llm.invoke("Once upon a time")`` returns the continuation only.

    ``batch`` runs all prompts as one batch on the model; ``stop`` works on every path,
    multi-token stops included; ``stream`` yields pieces as they are generated and fires
    ``on_llm_new_token`` for each.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _load(self) -> GPT2LLM:
        self._setup()
        return self

    @property
    def _llm_type(self) -> str:
        return "gpt2-chatbot"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._with_ls_params(super()._get_ls_params(stop=stop, **kwargs), stop, kwargs)

    def _request(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> GenerationRequest:
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        if self.safety:
            prompt = break_special_tokens(prompt, getattr(self.generator.tokenizer, "all_special_tokens", ()))
        if not self.generator.count_tokens(prompt):
            raise ValueError("a prompt must have some text to continue, got an empty one")
        return GenerationRequest(prompt, self._checked_length(self.decoding(**kwargs)), self._stops(stop),
                                 trim_to_sentence=False)

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        if self.streaming:
            generations = [[Generation(text="".join(c.text for c in self._stream(p, stop, run_manager, **kwargs)))]
                           for p in prompts]
            return LLMResult(generations=generations, llm_output={"model_name": self._model_name})
        requests = [self._request(p, stop, kwargs) for p in prompts]
        generations = []
        prompt_tokens = completion_tokens = 0
        for result, text, reasons in self._generate_checked(requests):
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            info = {"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens}
            if reasons:
                info["safety"] = list(reasons)
            generations.append([Generation(text=text, generation_info=info)])
        return LLMResult(generations=generations, llm_output={
            "model_name": self._model_name,
            "token_usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}})

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        request = self._request(prompt, stop, kwargs)
        for piece in self._stream_checked(request):
            chunk = GenerationChunk(text=piece)
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        request = self._request(prompt, stop, kwargs)
        async for piece in iterate_in_thread(lambda: self._stream_checked(request)):
            chunk = GenerationChunk(text=piece)
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk


# --------------------------------------------------------------------------- the chat model


class ChatGPT2(_GPT2Mixin, BaseChatModel):
    """A chat model on GPT-2: messages become a ``Name: text`` transcript, as in the engine.

    ``SystemMessage`` text leads the prompt (after a persona's description, if one is
    named); ``HumanMessage``s are spoken by their ``name`` or ``user_name``; ``AIMessage``s
    by the persona's speaker or ``ai_name``; a ``ChatMessage`` counts as one of these by its
    role. Empty messages are left out. The oldest messages leave first when the
    conversation outgrows the model's context, exactly as in the engine's rolling window.
    There is no tool calling and no structured output: `bind_tools` and
    `with_structured_output` raise `NotImplementedError` saying so.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    persona: str | None = None
    """A persona file from ``prompts/`` (its speaker, description and examples); None for plain names."""
    user_name: str = "User"
    ai_name: str = "Bot"
    window_chunk: int = 8
    response_bank: tuple[str, ...] = ("chitchat",)
    """Replies people wrote, offered beside the model's own and chosen by it, as the engine does
    (`Settings.response_bank`); used with the model this instance loads, not with a ``generator``
    given to it. Empty for the model's replies alone."""
    bank_candidates: int = 30
    sentence_encoder: str = BUNDLED_ENCODER
    """Whose sentence embeddings compare the bank's candidates with the conversation
    (`Settings.sentence_encoder`); empty to leave them out."""

    @model_validator(mode="after")
    def _load(self) -> ChatGPT2:
        if self.persona is not None:
            try:
                self._persona = get_persona(self.persona)
            except ChatbotError as err:
                raise ValueError(str(err)) from None
        else:
            self._persona = None
        if clean_speaker(self.user_name) != self.user_name or clean_speaker(self.ai_name) != self.ai_name:
            raise ValueError("`user_name` and `ai_name` must be single-line names without ':'")
        loads_its_model = self.generator is None
        self._setup()
        if loads_its_model and self.response_bank:
            try:
                object.__setattr__(self, "generator", _shared_bank(self.generator, tuple(self.response_bank),
                                                                   self.bank_candidates, self.sentence_encoder))
            except ChatbotError as err:
                raise ValueError(str(err)) from None
        return self

    _persona: Any = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "gpt2-chatbot-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**self._params(), "persona": self.persona}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._with_ls_params(super()._get_ls_params(stop=stop, **kwargs), stop, kwargs)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        raise NotImplementedError("ChatGPT2 does not support tool calling: a small GPT-2 cannot produce reliable "
                                  "tool calls. Use a model with tool support for agents.")

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ChatGPT2 does not support structured output: a small GPT-2 cannot follow a "
                                  "schema. Parse its text yourself, or use a model with structured output.")

    @property
    def _speaker(self) -> str:
        return self._persona.speaker if self._persona is not None else self.ai_name

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> GenerationRequest:
        settings = self._checked_length(self.decoding(**kwargs))
        specials = getattr(self.generator.tokenizer, "all_special_tokens", ())
        system: list[str] = [self._persona.description] if self._persona is not None else []
        turns: list[Turn] = []
        roles = [message_role(message) for message in messages]
        speakers = {self.user_name, self._speaker}
        for message, kind in zip(messages, roles):
            speakers.add(message.name or (self._speaker if kind == "bot" else self.user_name))
        for n, (message, kind) in enumerate(zip(messages, roles)):
            label = f"ChatGPT2 input {n} ({type(message).__name__})"
            if kind is None:
                what = f"a ChatMessage with role {message.role!r}" if isinstance(message, ChatMessage) \
                    else f"a {type(message).__name__}"
                raise ValueError(f"ChatGPT2 takes system, human and AI messages (or ChatMessages with role user, "
                                 f"assistant or system); input {n} is {what}")
            text = message_text(message, label)
            if kind == "system":
                system.append(text)
                continue
            if len(text) > MAX_TURN_CHARS:  # what the chatbot memory stores, so a history can keep it
                raise ValueError(f"{label} is {len(text)} characters; a message can have at most {MAX_TURN_CHARS}")
            if kind == "user":
                author, role = message.name or self.user_name, "user"
                if self.safety:
                    text = neutralise_speaker_tags(break_special_tokens(normalise(text), specials), speakers)
            else:
                if isinstance(message, AIMessage) and message.tool_calls:
                    raise ValueError("ChatGPT2 does not support tool calling; messages with tool calls cannot be sent")
                author, role = message.name or self._speaker, "bot"
            if text.strip():  # an empty message would be a bare "Name:" line in the transcript
                turns.append(Turn("langchain:call", author, role, text, 0.0, n))
        if not turns:
            raise ValueError("ChatGPT2 needs at least one human or AI message with text to reply to")
        try:
            planned = prompt_planner(
                self.generator, settings, speaker=self._speaker, preamble=" ".join(s for s in system if s.strip()),
                pinned=self._persona.example_turns() if self._persona is not None else (),
                speakers=(self.user_name,), chunk=self.window_chunk)(turns)
        except ChatbotError as err:
            raise ValueError(str(err)) from None
        stops = (*planned.stop_strings, *self._stops(stop))
        # A call carries its whole conversation: with a seed, the same messages get the same reply
        # and other messages another seed, not the same random draws.
        return GenerationRequest(planned.prompt, seeded_for(settings, planned.prompt), stops, planned.bot_texts,
                                 context=planned.said)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        result, text, reasons = self._generate_checked([request])[0]
        usage = {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        meta: dict[str, Any] = {"model_name": self._model_name, "finish_reason": result.finish_reason}
        if reasons:
            meta["safety"] = list(reasons)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self._model_name})

    def _last_chunk(self, request: GenerationRequest, pieces: list[str]) -> ChatGenerationChunk:
        """The closing chunk: token usage and finish reason, once the whole reply is known."""
        prompt_tokens = self.generator.count_tokens(request.prompt)
        out = self.generator.count_tokens("".join(pieces))
        usage = {"input_tokens": prompt_tokens, "output_tokens": out, "total_tokens": prompt_tokens + out}
        finish = "length" if out >= request.settings.max_new_tokens else "stop"
        return ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=usage, chunk_position="last",
            response_metadata={"model_name": self._model_name, "finish_reason": finish}))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        pieces: list[str] = []
        for piece in self._stream_checked(request):
            pieces.append(piece)
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._last_chunk(request, pieces)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        pieces: list[str] = []
        async for piece in iterate_in_thread(lambda: self._stream_checked(request)):
            pieces.append(piece)
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._last_chunk(request, pieces)
