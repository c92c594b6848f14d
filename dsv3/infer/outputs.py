"""What the engine hands back (as vLLM's `vllm.outputs`): each request's `RequestOutput` after a step,
the `RequestFailed` error of an `LLM.generate` call some of whose requests failed inside the engine,
and the engine's running `EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    text: str | None = None  # set when the engine has a tokenizer
    logprobs: list[dict[int, float]] | None = None  # per token: {token: logprob} (raw distribution)
    error: BaseException | None = field(default=None, repr=False, compare=False)  # finish_reason "error"
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class RequestFailed(RuntimeError):
    """Requests of one `LLM.generate` call failed inside the engine (a bug or a resource error, not
    bad input: that is refused when the request is added). `outputs` holds every output of the
    call in prompt order; the failed ones have finish_reason "error" and their exception in
    `error` (the first is this exception's __cause__)."""

    def __init__(self, failed: list[int], outputs: list[RequestOutput]) -> None:
        first = outputs[failed[0]].error
        super().__init__(
            f"prompts{failed[:10]}: {len(failed)} request(s) failed in the engine, the first with "
            f"{type(first).__name__}: {first}"
        )
        self.failed, self.outputs = failed, outputs
        self.__cause__ = first


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0  # tokens emitted by decode steps
    mixed_steps: int = 0  # steps with both prefill chunks and decodes
    max_running: int = 0
    max_waiting_while_running: int = 0  # requests that waited while others ran (admission control)
