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


class GenerateParameters(_Strict):
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    do_sample: bool | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = None
    stop: Annotated[list[StopStr], Field(max_length=MAX_STOP_SEQUENCES)] = []
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    return_full_text: bool = False
    details: bool = False
    # Keep only the last `truncate` prompt tokens instead of refusing a prompt longer than the context.
    truncate: Annotated[int, Field(ge=1)] | None = None
    # By default `inputs` is the user's question, wrapped in the artifact's prompt format (chat template).
    # false sends `inputs` to the model as raw text.
    apply_chat_template: bool = True

    @field_validator("max_new_tokens")
    @classmethod
    def _within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        _check_cap(value, info)
        return value

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams.build(
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            temperature=_floored(self.temperature),
            top_p=None if self.top_p is None else max(self.top_p, MIN_TOP_P),
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
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


class ChatRequest(_Strict):
    """OpenAI chat-completions request. Sampling defaults follow OpenAI: temperature 1, top_p 1."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]
    model: str | None = None  # accepted and echoed; this server hosts one model
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # vLLM extra
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = (
        None  # vLLM extra
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = 1
    user: str | None = None
    _max_new_tokens: int = PrivateAttr(0)

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        _check_cap(value, info)
        return value

    @model_validator(mode="after")
    def _settle_max_new_tokens(self, info: ValidationInfo) -> ChatRequest:
        default = _limits(info).default_max_new_tokens
        self._max_new_tokens = self.max_completion_tokens or self.max_tokens or default
        return self

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams.build(
            max_new_tokens=self._max_new_tokens,
            do_sample=temperature > 0,
            temperature=_floored(temperature),
            top_p=None if self.top_p is None else max(self.top_p, MIN_TOP_P),
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
        )

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


RequestModel = TypeVar("RequestModel", GenerateRequest, ChatRequest)


def validate(model: type[RequestModel], body: Any, limits: GenerationLimits) -> RequestModel:
    """`body` as a `model` request within the server's `limits`; a 422 naming the field when it is not one."""
    try:
        return model.model_validate(body, context={"limits": limits})
    except PydanticValidationError as e:
        raise ValidationError(describe(e)) from None


def describe(e: PydanticValidationError) -> str:
    """`parameters.temperature: Input should be greater than or equal to 0` (first few errors)."""
    parts = []
    for err in e.errors()[:3]:
        # Drop pydantic's union-branch names (e.g. `str`, `list[...]`) so the path names only fields.
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in ("str", "int")))]
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    return "; ".join(parts)
