"""What the harness scores: a local model (batched forwards for log-likelihoods, the inference
engine for generation) or any OpenAI-compatible server (the completions API).

Both answer two questions:
- loglikelihood([(context, continuation), ...]) -> [sum of log p(continuation tokens | context)]
- generate([GenRequest, ...]) -> [completion text]; a request with `suffix` asks for a FIM infill.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv3.errors import Dsv3Error


class BackendError(Dsv3Error, RuntimeError):
    """A backend cannot answer (a server unreachable or answering without logprobs, ...)."""


@dataclass(frozen=True)
class GenRequest:
    prompt: str  # the text to continue, or the prefix of a FIM infill
    temperature: float
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    suffix: str | None = None  # FIM: the text after the hole


class LocalBackend:
    """A Transformer with its tokenizer. Every text starts with bos, as documents do in training."""

    def __init__(self, model, tokenizer, batch_size: int = 16, **engine_options) -> None:
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        self.engine_options = engine_options
        self._llm = None
        self.max_len = model.config.max_seq_len

    @classmethod
    def from_checkpoint(cls, path: str, **options) -> LocalBackend:
        from dsv3.infer.llm import LLM

        llm = LLM(path)
        if llm.tokenizer is None:
            raise BackendError(f"--ckpt {path}: no tokenizer.json; the harness needs text")
        backend = cls(llm.model, llm.tokenizer, **options)
        backend._llm = llm
        return backend

    @property
    def name(self) -> str:
        return "local"

    def context_ids(self, context: str) -> list[int]:
        return [self.tok.bos_id, *self.tok.encode(context)]

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of the continuation's token log-probabilities after bos + context. Context and
        continuation are tokenized separately (so the continuation's tokens are the same after any
        context); too long sequences lose their oldest context tokens (bos stays). Batched by length, right-
        padded: the attention is causal, so padding after a row changes none of its logits."""
        seqs = []
        for ctx, cont in requests:
            cont_ids = self.tok.encode(cont)
            if not cont_ids:
                raise BackendError(f"continuation {cont!r}: encodes to no tokens")
            ids = keep_head(self.context_ids(ctx) + cont_ids, 1, self.max_len + 1)
            seqs.append((ids, len(cont_ids)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out = [0.0] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            T = max(len(seqs[i][0]) for i in chunk) - 1
            inputs = torch.zeros(len(chunk), T, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = seqs[i][0][:-1]
                inputs[row, : len(ids)] = torch.tensor(ids)
            logp = torch.log_softmax(self.model(inputs).float(), dim=-1)
            for row, i in enumerate(chunk):
                ids, n = seqs[i]
                targets = torch.tensor(ids[-n:])
                positions = torch.arange(len(ids) - 1 - n, len(ids) - 1)
                out[i] = float(logp[row, positions, targets].sum())
        return out

    def _engine(self):
        if self._llm is None:
            from dsv3.infer.llm import LLM

            self._llm = LLM(self.model, tokenizer=self.tok, **self.engine_options)
        return self._llm

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """All requests in one `LLM.generate` call: the engine batches them continuously."""
        from dsv3.data.fim import fim_prompt
        from dsv3.infer.sampling import SamplingParams

        llm = self._engine()
        prompts, params = [], []
        for r in requests:
            if r.suffix is not None:  # keep <bos><｜fim▁begin｜>, lose the oldest prefix tokens
                ids = keep_head(fim_prompt(self.tok, r.prompt, r.suffix), 2, self.max_len - 1)
            else:
                ids = keep_head(self.context_ids(r.prompt), 1, self.max_len - 1)
            prompts.append(ids)
            params.append(SamplingParams(temperature=r.temperature, max_tokens=r.max_tokens, stop=r.stop,
                                         seed=r.seed))  # fmt: skip
        outs = llm.generate(prompts, params) if prompts else []
        return [o.text if o.text is not None else self.tok.decode(o.token_ids) for o in outs]


def keep_head(ids: list[int], head: int, limit: int) -> list[int]:
    """`ids` cut to `limit` tokens by dropping the oldest ones after the first `head` (bos and any
    layout tokens that must open a prompt)."""
    if len(ids) <= limit:
        return ids
    return ids[:head] + ids[len(ids) - (limit - head) :]


# FIM markers as text, for servers that read special-token strings in prompts (DESIGN §6)
FIM_TEXT = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")


def server_bos(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str | None:
    """The bos text to put in front of every prompt sent to the server at `base_url`, so that it
    scores what LocalBackend scores (every text starts with bos): the `bos_token` of its
    /tokenizer_info (vLLM's endpoint, also dsv3 serve's) when that says the server does not add it
    itself (`add_bos_token` false: dsv3 checkpoints, served by dsv3 or vLLM); None when it adds it,
    or when the server has no /tokenizer_info."""
    root = base_url.rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(
        f"{root}/tokenizer_info", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            info = json.loads(resp.read())
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return None
    bos = info.get("bos_token") if isinstance(info, dict) else None
    if isinstance(bos, dict):  # transformers' AddedToken layout
        bos = bos.get("content")
    return bos if isinstance(bos, str) and bos and not info.get("add_bos_token", False) else None


class OpenAIBackend:
    """An OpenAI-compatible server's /v1/completions. Log-likelihoods as lm-evaluation-harness asks
    for them: the prompt is context + continuation with echo=true, logprobs=1, max_tokens=0, and the
    continuation's score is the sum of the echoed token logprobs whose text offset is at or past
    the context's end (the first token, which has no logprob, is never part of it). `bos`: text put
    in front of every prompt (see server_bos), as LocalBackend puts bos in front of every text."""

    def __init__(
        self,
        base_url: str,
        model: str = "dsv3",
        timeout_s: float = 600.0,
        api_key: str | None = None,
        bos: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model, self.timeout_s, self.api_key, self.bos = model, timeout_s, api_key, bos or ""

    @property
    def name(self) -> str:
        return f"openai({self.base_url})"

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.base_url}/completions",
            data=json.dumps({"model": self.model, **body}).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200]
            raise BackendError(f"{self.base_url}/completions: HTTP {e.code} ({detail})") from None
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(f"{self.base_url}/completions: cannot reach the server ({e})") from None
        except json.JSONDecodeError:
            raise BackendError(f"{self.base_url}/completions: the answer is not JSON") from None

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        out = []
        for ctx, cont in requests:
            ctx = self.bos + ctx
            answer = self._post({"prompt": ctx + cont, "echo": True, "logprobs": 1, "max_tokens": 0,
                                 "temperature": 0.0})  # fmt: skip
            try:
                lp = answer["choices"][0]["logprobs"]
                pairs = zip(lp["text_offset"], lp["token_logprobs"])
                total = sum(v for off, v in pairs if off >= len(ctx) and v is not None)
            except (KeyError, IndexError, TypeError):
                raise BackendError(
                    f"{self.base_url}/completions: no echoed logprobs in the answer (needs echo + logprobs)"
                ) from None
            out.append(float(total))
        return out

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        out = []
        for r in requests:
            prompt = (
                r.prompt
                if r.suffix is None
                else f"{FIM_TEXT[0]}{r.prompt}{FIM_TEXT[1]}{r.suffix}{FIM_TEXT[2]}"
            )
            body = {"prompt": self.bos + prompt, "max_tokens": r.max_tokens, "temperature": r.temperature}
            if r.stop:
                body["stop"] = list(r.stop)[:4]  # the OpenAI API takes at most 4 stop strings
            if r.seed is not None:
                body["seed"] = r.seed
            answer = self._post(body)
            try:
                text = answer["choices"][0]["text"]
            except (KeyError, IndexError, TypeError):
                raise BackendError(f"{self.base_url}/completions: no choices[0].text in the answer") from None
            out.append(_cut_at_stop(text, r.stop))  # stops beyond the 4 the server saw
        return out


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
