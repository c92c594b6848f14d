"""Request bodies of the OpenAI-compatible API (pydantic v2) and the OpenAI error body.

Types are strict (a string is not a number, `true` is not 1), so that a wrong type is a 400 naming
the field rather than a silent coercion. Fields a client may send that we do not use (e.g.
`presence_penalty` at its default) are accepted and ignored, as the OpenAI clients send some of them.
Responses are plain dicts built by dsv3.serve.app in the shape OpenAI returns.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # as OpenAI

Number = StrictFloat | StrictInt
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """The sampling fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1 or 0: all tokens (vLLM: -1)
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[StrictInt, Field(ge=0, lt=2**64)] | None = None
    stop: (
        StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=16)] | None
    ) = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None  # only the default
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None


class CompletionRequest(Sampling):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    suffix: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    # vLLM's field (lm-evaluation-harness sends False): dsv3's tokenizer adds no special tokens to
    # text either way (its tokenizer.json has no post-processor), so both values give the same ids
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


def error_body(message: str, type_: str, param: str | None = None, code: int | str | None = None) -> dict:
    """{"error": {message, type, param, code}} as OpenAI returns it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
