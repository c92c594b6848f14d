"""Tokens as the OpenAI API shows them: their strings and bytes, and the two logprobs layouts.

A token that is part of a character (or has no text) is written `bytes:\\xNN..` of its raw bytes,
as vLLM writes it, so that distinct tokens never share a string. Completions report
`{tokens, token_logprobs, top_logprobs, text_offset}`; chat reports one `content` entry per token
with its bytes and its top alternatives.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv3.data.tokenizer import Tokenizer
    from dsv3.serve.streaming import Choice


class TokenText:
    """Strings, bytes and logprobs entries of token ids under one tokenizer (or none: ids only)."""

    def __init__(self, tok: Tokenizer | None) -> None:
        self.tok = tok

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok is not None else ""

    def token_str(self, t: int) -> str:
        """The token's text, or `bytes:\\xNN..` of its raw bytes (see the module docstring)."""
        if self.tok is None:
            return f"token_id:{t}"
        s = self.tok.decode([t])
        if s and "\ufffd" not in s:
            return s
        raw = self.tok.hf.id_to_token(t)
        if raw is None:
            return f"token_id:{t}"
        inverse = _byte_decoder()
        if all(c in inverse for c in raw):
            return "bytes:" + "".join(f"\\x{inverse[c]:02x}" for c in raw)
        return raw

    def token_bytes(self, t: int) -> list[int]:
        raw = self.tok.hf.id_to_token(t) if self.tok is not None else None
        inverse = _byte_decoder()
        if raw is not None and all(c in inverse for c in raw):
            return [inverse[c] for c in raw]
        return list(self.token_str(t).encode("utf-8"))

    def top(self, entry: dict[int, float], n: int) -> dict[str, float]:
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
        return {self.token_str(t): v for t, v in best}

    def completion_logprobs(self, ch: Choice, n: int, prompt_lp: list | None, prefix_text: str, start: int = 0,
                            base: int = 0) -> dict:  # fmt: skip
        """OpenAI's completions logprobs of ch's tokens [start:] (and of the echoed prompt)."""
        tokens, lps, tops, offsets = [], [], [], []
        if prompt_lp is not None:
            for i, (t, entry) in enumerate(zip(ch.prompt, prompt_lp)):
                tokens.append(self.token_str(t))
                lps.append(None if entry is None else entry[t])
                tops.append(None if entry is None else self.top(entry, n))
                offsets.append(len(self.decode(ch.prompt[:i])))
        base += len(prefix_text)
        for i in range(start, len(ch.token_ids)):
            t, entry = ch.token_ids[i], ch.logprobs[i]
            tokens.append(self.token_str(t))
            lps.append(entry[t])
            tops.append(self.top(entry, n))
            offsets.append(base + len(self.decode(ch.token_ids[:i])))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, ch: Choice, start: int, n: int) -> list[dict]:
        """OpenAI's chat logprobs `content` entries of ch's tokens [start:]."""

        def one(t: int, logprob: float) -> dict:
            return {"token": self.token_str(t), "logprob": logprob, "bytes": self.token_bytes(t)}

        out = []
        for t, entry in zip(ch.token_ids[start:], ch.logprobs[start:]):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
            out.append({**one(t, entry[t]), "top_logprobs": [one(k, v) for k, v in top]})
        return out


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from dsv3.data.tokenizer import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}
