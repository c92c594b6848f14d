"""Fill-in-the-Middle (report §4.1, following DeepSeek-Coder-V2 and Bavarian et al. 2022).

Before packing, each document is independently turned into a FIM example with probability
`rate` (0.1 in V3). Its text is cut at two uniformly random character positions into
prefix | middle | suffix, the three parts are tokenized separately, and laid out as

    PSM: <bos> <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <eos>
    SPM: <bos> <｜fim▁begin｜> <｜fim▁hole｜> suffix <｜fim▁end｜> prefix middle <eos>

PSM is V3's order; SPM (the variant of Bavarian et al. §3 where the prefix directly precedes the
middle) is optional, chosen for a fraction `spm_rate` of the FIM documents. Other documents become
`<bos> text <eos>`.

Every document starts with bos, FIM or not: bos marks "a new document starts here" in the packed
stream (there is no attention mask between documents, §4.1), so a prompt at inference, which is
the start of a document, starts with bos too (as the chat format does). `fim_prompt` builds exactly
the training-time layout up to and including `<｜fim▁end｜>` (plus the prefix for SPM), so the model
continues with the middle and stops at eos.

Randomness comes only from the generator passed in; the dataset seeds one per document from
(seed, document name), so the result does not depend on processing order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv3 import paper
from dsv3.data.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class FIMConfig:
    rate: float = paper.FIM_RATE  # probability that a document becomes a FIM example
    spm_rate: float = 0.0  # among FIM examples, the fraction in SPM order (0: PSM only, as V3)

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: must be a probability in [0, 1], got {v}")


def split_text(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cut at two uniform random character positions: (prefix, middle, suffix)."""
    i, j = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return text[:i], text[i:j], text[j:]


def fim_ids(tok: Tokenizer, prefix: str, middle: str, suffix: str, spm: bool = False) -> list[int]:
    """The training layout of one FIM document (PSM, or SPM if `spm`)."""
    return fim_prompt(tok, prefix, suffix, spm=spm) + tok.encode(middle) + [tok.eos_id]


def fim_prompt(tok: Tokenizer, prefix: str, suffix: str, *, spm: bool = False) -> list[int]:
    """Inference prompt for `complete(prefix, suffix)`: the model generates the middle, then eos."""
    begin, hole, end = _fim_ids(tok)
    if spm:
        return [tok.bos_id, begin, hole, *tok.encode(suffix), end, *tok.encode(prefix)]
    return [tok.bos_id, begin, *tok.encode(prefix), hole, *tok.encode(suffix), end]


def document_ids(tok: Tokenizer, text: str, rng: np.random.Generator, fim: FIMConfig) -> list[int]:
    """One document as training tokens: a FIM example with probability `fim.rate`, else bos+text+eos."""
    # draw both decisions up front so the stream of random numbers does not depend on the outcome
    is_fim, is_spm = rng.random() < fim.rate, rng.random() < fim.spm_rate
    if not is_fim:
        return [tok.bos_id, *tok.encode(text), tok.eos_id]
    prefix, middle, suffix = split_text(text, rng)
    return fim_ids(tok, prefix, middle, suffix, spm=is_spm)


def _fim_ids(tok: Tokenizer) -> tuple[int, int, int]:
    ids = (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id)
    if None in ids:
        raise TokenizerError("FIM needs <｜fim▁begin｜>, <｜fim▁hole｜> and <｜fim▁end｜> in the tokenizer")
    return ids  # type: ignore[return-value]
