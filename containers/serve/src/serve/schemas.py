"""Wire models for /invocations, with the limits named and quoted in error messages.

Two request shapes are accepted, like TGI's /invocations: TGI's `{"inputs", "parameters", "stream"}` and
OpenAI's chat `{"messages", ...}`. Both turn into the engine's SamplingParams through one precedence rule:
the request's value, else the server default, else the API's default.

The server's generation limits reach a request one way: `validate(..., limits)` checks the cap and settles
how many tokens the request gets, and `sampling()` reads that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from serve.config import ServeConfig
from serve.errors import ValidationError
from serve.generation import SamplingParams

MAX_STOP_SEQUENCES = 4
# Each stop string is matched against the held-back tail of the answer at every token: bound its length.
MAX_STOP_SEQUENCE_CHARS = 256
MAX_INPUTS_PER_REQUEST = 32
# A conversation longer than this is refused before its chat template is rendered (the context bounds the
# tokens; this bounds the work of getting there).
MAX_CHAT_MESSAGES = 1024
MAX_SEED = 2**63 - 1
# Sampling divides the float32 logits by these: a temperature or penalty near 0 overflows them to inf, the
# probabilities become NaN, and the failed step would fail every request batched with this one. vLLM
# raises temperatures below 0.01 to 0.01 for the same reason; we do the same, and bound the penalty.
MIN_TEMPERATURE = 0.01
# top_p under float32's smallest number compares as 0 and would drop every token; any top_p this small
# means "keep only the most likely token", so it is raised to this floor with the same effect.
MIN_TOP_P = 1e-6
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0

NonEmptyStr = Annotated[str, Field(min_length=1)]
StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS)]


@dataclass(frozen=True)
class GenerationLimits:
    """How many new tokens a request may ask for, and how many it gets when it does not say."""

    max_new_tokens_cap: int
    default_max_new_tokens: int

    @classmethod
    def of(cls, config: ServeConfig) -> GenerationLimits:
        return cls(config.max_new_tokens_cap, config.default_max_new_tokens)


class _Strict(BaseModel):
    # Unknown fields are an error naming the field: a typo like "max_token" must not be silently ignored.
    # NaN and Infinity are valid to Python's json module but not numbers any sampler can use.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _floored(temperature: float | None) -> float | None:
    """0 stays 0 (greedy); anything between 0 and MIN_TEMPERATURE becomes MIN_TEMPERATURE."""
    if temperature is None or temperature == 0:
        return temperature
    return max(temperature, MIN_TEMPERATURE)


def _limits(info: ValidationInfo) -> GenerationLimits:
    return info.context["limits"]  # always given: requests are validated by validate() only


def _check_cap(max_new_tokens: int | None, info: ValidationInfo) -> None:
    cap = _limits(info).max_new_tokens_cap
    if max_new_tokens is not None and max_new_tokens > cap:
        raise ValueError(f"{max_new_tokens} is above this server's cap of {cap} (SERVE_MAX_NEW_TOKENS)")


# TGI's default --max-top-n-tokens: per generated token, at most this many alternatives are reported.
MAX_TOP_N_TOKENS = 5
# TGI fields this server accepts only at their default value (null, or this value): set otherwise, the request
# is refused with a 422 naming the field rather than answered as if the field had been honoured.
_DEFAULT_ONLY = {
    "best_of": (1, "only 1: one sequence per input is generated (several samples: repeat the prompt in `inputs`)"),
    "frequency_penalty": (0, "only 0: frequency penalty is not implemented (repetition_penalty is)"),
    "watermark": (False, "only false: watermarking is not implemented"),
    "grammar": (None, "only null: constrained generation (grammar) is not implemented"),
    "adapter_id": (None, "only null: this server serves its one model, with no LoRA adapters to choose from"),
}


class GenerateParameters(_Strict):
    """TGI's GenerateParameters (router/src/lib.rs), every field, so TGI's own clients work unchanged; null means
    unset. Fields this server does not implement are accepted at their default only (see _DEFAULT_ONLY)."""

    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    typical_p: Annotated[float, Field(gt=0, le=1)] | None = None  # 1 (or null) is off
    # TGI's rule: a sampling knob set (temperature, top_p, top_k, typical_p) samples even with do_sample false.
    do_sample: bool | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = None
    stop: Annotated[list[StopStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    return_full_text: bool | None = None
    details: bool | None = None
    # The prompt's tokens with their log-probabilities, in details.prefill (implies details; not when streaming).
    decoder_input_details: bool | None = None
    # Per generated token, this many most likely alternatives (details.top_tokens, a stream frame's top_tokens).
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    # Keep only the last `truncate` prompt tokens instead of refusing a prompt longer than the context.
    truncate: Annotated[int, Field(ge=1)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    watermark: bool | None = None
    grammar: Any = None
    adapter_id: str | None = None
    # By default `inputs` is the user's question, wrapped in the artifact's prompt format (chat template).
    # false sends `inputs` to the model as raw text.
    apply_chat_template: bool = True
    # Ours, beyond TGI's: when the model ships a retrieval index, passages retrieved for `inputs` go into the
    # prompt and the reply lists them (`sources`). null: on when there is an index; false: off; true: on, and a
    # 422 if the model has none. Raw text (apply_chat_template false) never retrieves.
    retrieval: bool | None = None

    @field_validator("retrieval")
    @classmethod
    def _retrieval_needs_template(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("apply_chat_template") is False:
            raise ValueError(
                "true needs apply_chat_template true (passages go into the prompt through the chat template; "
                "raw text is sent as it is)"
            )
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        _check_cap(value, info)
        return value

    @field_validator(*_DEFAULT_ONLY)
    @classmethod
    def _default_only(cls, value: Any, info: ValidationInfo) -> Any:
        default, why = _DEFAULT_ONLY[info.field_name]
        if value is not None and value != default:
            raise ValueError(f"not supported by this server; {why}")
        return value

    @property
    def wants_details(self) -> bool:
        """TGI answers with details when asked for them or for the prompt's scores."""
        return bool(self.details or self.decoder_input_details)

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams.build(
            max_new_tokens=max_new_tokens,
            do_sample=True if self.do_sample else None,  # false or unset: sampling if a knob says so (TGI)
            temperature=_floored(self.temperature),
            top_p=None if self.top_p is None else max(self.top_p, MIN_TOP_P),
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            typical_p=self.typical_p,
            top_n_tokens=self.top_n_tokens or 0,
            prefill_logprobs=bool(self.decoder_input_details),
        )


class GenerateRequest(_Strict):
    inputs: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)]
    parameters: GenerateParameters = GenerateParameters()
    stream: bool = False
    _max_new_tokens: int = PrivateAttr(0)

    @model_validator(mode="after")
    def _stream_single(self) -> GenerateRequest:
        if self.stream and isinstance(self.inputs, list):
            raise ValueError("stream: streaming takes one input; send `inputs` as a string")
        if self.stream and self.parameters.decoder_input_details:
            raise ValueError(
                "parameters.decoder_input_details: not available when streaming (as in TGI); ask without `stream`"
            )
        return self

    @model_validator(mode="after")
    def _settle_max_new_tokens(self, info: ValidationInfo) -> GenerateRequest:
        self._max_new_tokens = self.parameters.max_new_tokens or _limits(info).default_max_new_tokens
        return self

    @property
    def texts(self) -> list[str]:
        """`inputs` as a list: one generation each."""
        return self.inputs if isinstance(self.inputs, list) else [self.inputs]

    def sampling(self) -> SamplingParams:
        return self.parameters.sampling(self._max_new_tokens)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# ----- OpenAI: chat completions and (legacy) completions -----

# Choices one request may ask for (`n`), and generations in all (prompts x n for completions).
MAX_CHOICES = 8
MAX_GENERATIONS_PER_REQUEST = MAX_INPUTS_PER_REQUEST
# Alternatives per generated token: chat's `top_logprobs` and completions' `logprobs`, OpenAI's own limits.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

# OpenAI fields this server does not implement: accepted only with the value that asks for nothing (so a
# client that always sends `presence_penalty: 0` works), else refused naming the field. See docs/serving.md.
_NEUTRAL_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "frequency_penalty": ((0,), "send 0 or leave it out; `repetition_penalty` (vLLM's extra) is supported"),
    "presence_penalty": ((0,), "send 0 or leave it out; `repetition_penalty` (vLLM's extra) is supported"),
    "logit_bias": (({},), "send {} or leave it out"),
    "tools": (([],), "tool calling is not supported"),
    "tool_choice": (("none", "auto"), 'tool calling is not supported: send "none" or leave it out'),
    "response_format": (
        ({"type": "text"},),
        'structured output is not supported: send {"type": "text"} or leave it out',
    ),
    "suffix": (("",), "insertion (suffix) is not supported"),
}


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with `usage` and empty `choices`, before [DONE]


class _OpenAIRequest(_Strict):
    """What OpenAI's chat and completions requests share. Sampling defaults follow OpenAI: temperature 1,
    top_p 1. `model` is accepted whatever it says (this server hosts one model; the reply names it)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # vLLM extra
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = (
        None  # vLLM extra
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only when they ask for nothing (_NEUTRAL_ONLY).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted and ignored: they change nothing about the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    _max_new_tokens: int = PrivateAttr(0)

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        _check_cap(value, info)
        return value

    @field_validator(*_NEUTRAL_ONLY, check_fields=False)
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        allowed, hint = _NEUTRAL_ONLY[info.field_name]
        if value is not None and value not in allowed:
            raise ValueError(f"not supported by this server ({hint})")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _settle_max_new_tokens(self, info: ValidationInfo) -> _OpenAIRequest:
        asked = getattr(self, "max_completion_tokens", None) or self.max_tokens
        self._max_new_tokens = asked or _limits(info).default_max_new_tokens
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def top_n_tokens(self) -> int:
        """Alternatives the engine reports per token (0: the chosen token's logprob only)."""
        return 0

    def sampling(self, choice: int = 0) -> SamplingParams:
        """Choice `choice` of `n`: with a seed, each choice samples with its own (seed + choice)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams.build(
            max_new_tokens=self._max_new_tokens,
            do_sample=temperature > 0,
            temperature=_floored(temperature),
            top_p=None if self.top_p is None else max(self.top_p, MIN_TOP_P),
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
            stop=stop,
            top_n_tokens=self.top_n_tokens(),
        )


class ChatRequest(_OpenAIRequest):
    """OpenAI chat-completions request (POST /v1/chat/completions, and `messages` bodies on /invocations)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Accepted only when they ask for nothing (_NEUTRAL_ONLY); parallel_tool_calls means nothing without tools.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Ours: passages retrieved for the last user message go into the prompt (see GenerateParameters.retrieval).
    retrieval: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    def top_n_tokens(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_OpenAIRequest):
    """OpenAI (legacy) completions request, POST /v1/completions: `prompt` is raw text, no chat template."""

    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None  # accepted only when empty (_NEUTRAL_ONLY)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and value and any(isinstance(x, int | list) for x in value):
            raise ValueError("token-id prompts are not supported; send the prompt as text")
        return value

    @model_validator(mode="after")
    def _within_limits(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: not supported by this server (send the same value as n, or leave it out)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: not supported together with logprobs (prompt logprobs are not returned)")
        if len(self.prompts) * self.n > MAX_GENERATIONS_PER_REQUEST:
            raise ValueError(
                f"n: {len(self.prompts)} prompts x n={self.n} is more than {MAX_GENERATIONS_PER_REQUEST} "
                "generations in one request"
            )
        return self

    @property
    def prompts(self) -> list[str]:
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    def top_n_tokens(self) -> int:
        return self.logprobs or 0


RequestModel = TypeVar("RequestModel", GenerateRequest, ChatRequest, CompletionRequest)


def validate(model: type[RequestModel], body: Any, limits: GenerationLimits) -> RequestModel:
    """`body` as a `model` request within the server's `limits`; a 422 naming the field when it is not one."""
    try:
        return model.model_validate(body, context={"limits": limits})
    except PydanticValidationError as e:
        raise ValidationError(describe(e)) from None


def _is_branch_name(part: str) -> bool:
    """pydantic's name for a union branch (`str`, `list[...]`, `constrained-str`), not a field."""
    return "[" in part or part in ("str", "int") or part.startswith("constrained-")


def describe(e: PydanticValidationError) -> str:
    """`parameters.temperature: Input should be greater than or equal to 0` (first few errors)."""
    parts = []
    for err in e.errors()[:3]:
        # Drop pydantic's union-branch names (e.g. `str`, `list[...]`) so the path names only fields.
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and _is_branch_name(x))]
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    return "; ".join(parts)
