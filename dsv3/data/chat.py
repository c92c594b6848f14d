"""Chat data for supervised fine-tuning (§5.1): conversations rendered in the V3 chat format with
a loss mask, the chat special tokens and their migration, and a locally synthesised demo set.

A conversation `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` is
rendered exactly as `Tokenizer.apply_chat_template(messages, add_generation_prompt=False)`:

    <bos> system <｜User｜> user <｜Assistant｜> assistant <eos> <｜User｜> user <｜Assistant｜> assistant <eos>

A prompt-completion row `{"prompt": str, "completion": str}` (the format of OpenAI's legacy
fine-tuning files and TRL's prompt-completion data sets) is rendered plainly, without the chat
markers: `<bos> prompt completion <eos>`, the two parts tokenized apart (as a prompt is at
inference), the mask 1 on the completion and its eos.

The loss mask is 1 on exactly the tokens the model writes in a chat: each assistant reply's
content and the eos that ends it (so it learns to stop); 0 on bos, the system prompt, the user
turns and the role markers, which the chat prompt provides (`<｜Assistant｜>` is the generation
prompt). Training predicts token i+1 from tokens <= i, so label i is token i+1 where mask[i+1] is 1.

`<｜User｜>` and `<｜Assistant｜>` are real special tokens (one id each, never produced by text):
tokenizers trained by dsv3 since this change have them (ids 5 and 6); `add_chat_tokens` adds them
to an older tokenizer (new ids at the end) and `resize_vocab` grows a model's embedding and head to
match (new rows: the mean of the existing ones), which `dsv3 convert --add-chat-tokens` does to a
checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint import load_pretrained, save_pretrained
from dsv3.data.tokenizer import ASSISTANT, USER, Tokenizer, TokenizerError
from dsv3.errors import Dsv3Error


class ChatDataError(Dsv3Error, ValueError):
    """A chat data file is malformed; the message is `file:line: what is wrong`."""


def render(
    tok: Tokenizer, messages: Sequence[dict[str, str]] | dict[str, str]
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation in the V3 chat format, or of one prompt-completion
    row (see the module docstring)."""
    if isinstance(messages, dict):
        prompt, completion = (
            tok._encode_plain(messages["prompt"]),
            [*tok._encode_plain(messages["completion"]), tok.eos_id],
        )
        return [tok.bos_id, *prompt, *completion], [0] * (1 + len(prompt)) + [1] * len(completion)
    if tok.user_id is None or tok.assistant_id is None:
        raise TokenizerError(
            "the tokenizer has no <｜User｜>/<｜Assistant｜> tokens; migrate it (add_chat_tokens)"
        )
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
    ids, mask = [tok.bos_id, *tok._encode_plain(system)], [0] * (1 + len(tok._encode_plain(system)))
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{i}].content: must be a string, got {type(content).__name__}")
        if role == "user":
            part = [tok.user_id, *tok._encode_plain(content)]
            ids += part
            mask += [0] * len(part)
        elif role == "assistant":
            reply = [*tok._encode_plain(content), tok.eos_id]
            ids += [tok.assistant_id, *reply]
            mask += [0] + [1] * len(reply)
        elif role != "system":
            raise TokenizerError(f"messages[{i}].role: must be system, user or assistant; got {role!r}")
    return ids, mask


def read_conversations(path: str | Path) -> list[list[dict[str, str]] | dict[str, str]]:
    """The `messages` of every line of a JSONL file, or the line itself for a prompt-completion row;
    ChatDataError naming file and line."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "messages" not in row and ("prompt" in row or "completion" in row):
            for name in ("prompt", "completion"):
                if not isinstance(row.get(name), str):
                    raise ChatDataError(f"{path}:{n}: '{name}' must be a string in a prompt-completion row")
            if not row["completion"]:
                raise ChatDataError(f"{path}:{n}: empty 'completion' (nothing to learn)")
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ChatDataError(
                f"{path}:{n}: expected an object with a non-empty 'messages' list (or 'prompt' and 'completion')"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ChatDataError(f"{path}:{n}: messages[{i}].role must be system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise ChatDataError(f"{path}:{n}: messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatDataError(f"{path}:{n}: no assistant message (nothing to learn)")
        out.append(messages)
    if not out:
        raise ChatDataError(f"{path}: no conversations")
    return out


def batch(
    tok: Tokenizer, conversations: Sequence[Sequence[dict[str, str]]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One conversation per row, cut to seq_len + 1 tokens and right-padded: (input_ids [B, T],
    labels [B, T]) with IGNORE_INDEX wherever the next token is not an assistant token or is
    padding. A row attends only to its own tokens (causal attention, padding after them)."""
    from dsv3.model.transformer import IGNORE_INDEX

    rows = [render(tok, c) for c in conversations]
    T = min(seq_len, max(len(ids) for ids, _ in rows) - 1)
    inputs = torch.full((len(rows), T), tok.eos_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids, mask = ids[: T + 1], mask[: T + 1]
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        labels[r, :n] = target.masked_fill(~keep, IGNORE_INDEX)
    return inputs, labels


# ---- chat tokens: migration --------------------------------------------------------------------------
def add_chat_tokens(tok: Tokenizer) -> tuple[Tokenizer, bool]:
    """The tokenizer with `<｜User｜>` and `<｜Assistant｜>` as special tokens (added at the end if it
    lacks them), and whether it changed."""
    if tok.user_id is not None and tok.assistant_id is not None:
        return tok, False
    from tokenizers import AddedToken

    tok.hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (USER, ASSISTANT)])
    return Tokenizer(tok.hf, bos_token=tok.bos_token, eos_token=tok.eos_token), True


@torch.no_grad()
def resize_vocab(model, vocab_size: int) -> bool:
    """Grow the model's embedding and head to `vocab_size` rows (new rows: the mean of the old
    ones, so the new tokens start as an average token); False when it already has enough."""
    old = model.config.vocab_size
    if vocab_size <= old:
        return False
    emb, head = model.embed_tokens.weight, model.lm_head.weight
    new_emb = torch.nn.Embedding(vocab_size, emb.shape[1], dtype=emb.dtype, device=emb.device)
    new_head = torch.nn.Linear(head.shape[1], vocab_size, bias=False, dtype=head.dtype, device=head.device)
    new_emb.weight[:old] = emb
    new_emb.weight[old:] = emb.mean(0)
    new_head.weight[:old] = head
    new_head.weight[old:] = head.mean(0)
    model.embed_tokens, model.lm_head = new_emb, new_head
    model.config = model.config.replace(vocab_size=vocab_size)
    return True


def migrate_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Copy checkpoint `src` to `dst` with the chat tokens in its tokenizer and room for them in
    its model (`dsv3 convert --add-chat-tokens`)."""

    tok = Tokenizer.load(src)
    tok, added = add_chat_tokens(tok)
    model = load_pretrained(src)
    grown = resize_vocab(model, tok.vocab_size)
    Path(dst).mkdir(parents=True, exist_ok=True)
    save_pretrained(model, dst)
    tok.save(dst)
    return {"added_tokens": added, "user_id": tok.user_id, "assistant_id": tok.assistant_id,
            "vocab_size": model.config.vocab_size, "resized": grown}  # fmt: skip
