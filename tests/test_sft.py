"""Chat SFT: the V3 chat format with an assistant-only loss mask (token by token), the chat special
tokens and their migration, batches without cross-conversation leakage, the scaled schedule,
`dsv3 sft` on a tiny model and the synthesised demo set."""

import json
import math

import pytest
import torch

from dsv3 import ModelConfig, Transformer, paper
from dsv3.checkpoint import load_pretrained, save_pretrained
from dsv3.data.chat import add_chat_tokens, batch, read_conversations, render, resize_vocab
from dsv3.data.tokenizer import ASSISTANT, SPECIAL_TOKENS, USER, Tokenizer
from dsv3.model.transformer import IGNORE_INDEX
from dsv3.train.sft import SFTConfig, cosine_lr, peak_lr, run_sft

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.\n"] * 20
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "To be"},
    {"role": "user", "content": "add?"},
    {"role": "assistant", "content": "a + b"},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, 300, show_progress=False)


def test_the_loss_mask_covers_exactly_the_assistant_tokens(tok):
    ids, mask = render(tok, CONVERSATION)
    enc = tok.encode
    # built by hand: (tokens, trained on them?)
    expected = [
        ([tok.bos_id], 0), (enc("Be brief."), 0),
        ([tok.user_id], 0), (enc("Hi"), 0),
        ([tok.assistant_id], 0), (enc("To be"), 1), ([tok.eos_id], 1),
        ([tok.user_id], 0), (enc("add?"), 0),
        ([tok.assistant_id], 0), (enc("a + b"), 1), ([tok.eos_id], 1),
    ]  # fmt: skip
    want_ids = [t for part, _ in expected for t in part]
    want_mask = [m for part, m in expected for _ in part]
    assert ids == want_ids and mask == want_mask
    assert ids == tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    inputs, labels = batch(tok, [CONVERSATION], seq_len=200)
    assert inputs[0].tolist() == ids[:-1]
    for i, label in enumerate(labels[0].tolist()):  # label i is token i+1, kept iff it is an assistant token
        assert label == (ids[i + 1] if mask[i + 1] else IGNORE_INDEX), i


def test_rows_are_padded_and_never_see_each_other(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "To be"}]
    inputs, labels = batch(tok, [CONVERSATION, short], seq_len=200)
    n = len(render(tok, short)[0]) - 1
    assert (labels[1, n:] == IGNORE_INDEX).all() and (inputs[1, n:] == tok.eos_id).all()
    alone_inputs, _ = batch(tok, [short], seq_len=200)
    with torch.no_grad():
        together, alone = model(inputs)[1, :n], model(alone_inputs)[0, :n]
    assert torch.allclose(together, alone, atol=1e-5)  # the other conversation changes nothing
    cut_inputs, cut_labels = batch(tok, [CONVERSATION], seq_len=5)
    assert cut_inputs.shape == (1, 5) and cut_labels.shape == (1, 5)


def _old_tokenizer(monkeypatch) -> Tokenizer:
    """A tokenizer trained as before the chat tokens existed (five special tokens)."""
    import dsv3.data.tokenizer as tokmod

    monkeypatch.setattr(tokmod, "SPECIAL_TOKENS", SPECIAL_TOKENS[:5])
    old = Tokenizer.train(TEXTS, 300, show_progress=False)
    assert old.user_id is None and old.assistant_id is None
    return old


def test_chat_markers_are_special_tokens_and_old_tokenizers_migrate(tok, monkeypatch):
    assert (USER, ASSISTANT) == SPECIAL_TOKENS[5:] and (tok.user_id, tok.assistant_id) == (5, 6)
    ids = tok.apply_chat_template([{"role": "user", "content": f"say {USER}"}])
    assert ids.count(tok.user_id) == 1  # typed in a message it stays text
    old = _old_tokenizer(monkeypatch)
    n = old.vocab_size
    migrated, changed = add_chat_tokens(old)
    assert changed and (migrated.user_id, migrated.assistant_id) == (n, n + 1)
    assert migrated.encode(USER) == [n] and migrated.vocab_size == n + 2
    assert add_chat_tokens(migrated)[1] is False


def test_resize_vocab_keeps_old_rows_and_convert_migrates_a_checkpoint(tmp_path, capsys, monkeypatch):
    from dsv3.cli import main

    old = _old_tokenizer(monkeypatch)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=old.vocab_size)
    model = Transformer(cfg)
    src = tmp_path / "src"
    save_pretrained(model, src)
    old.save(src)
    monkeypatch.undo()
    assert main(["convert", "--add-chat-tokens", str(src), str(tmp_path / "dst")]) == 0
    assert "<｜User｜> =" in capsys.readouterr().out
    new_tok, new_model = Tokenizer.load(tmp_path / "dst"), load_pretrained(tmp_path / "dst")
    n = cfg.vocab_size
    assert (new_tok.user_id, new_tok.assistant_id) == (n, n + 1)
    assert new_model.config.vocab_size == new_tok.vocab_size == n + 2
    assert torch.equal(new_model.embed_tokens.weight[:n], model.embed_tokens.weight)
    assert torch.equal(new_model.lm_head.weight[:n], model.lm_head.weight)
    assert torch.allclose(new_model.embed_tokens.weight[n], model.embed_tokens.weight.mean(0))
    assert not resize_vocab(new_model, 10)  # never shrinks


def test_the_scaled_post_training_schedule(tmp_path):
    assert cosine_lr(5e-6, 1e-6, 0, 11) == pytest.approx(5e-6)
    assert cosine_lr(5e-6, 1e-6, 5, 11) == pytest.approx(3e-6)
    assert cosine_lr(5e-6, 1e-6, 10, 11) == pytest.approx(1e-6)
    lrs = [cosine_lr(5e-6, 1e-6, s, 11) for s in range(11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    (tmp_path / "trainer.json").write_text(json.dumps({"config": {"lr": 2.2e-3}}))
    assert peak_lr(SFTConfig(init=str(tmp_path), data="x")) == pytest.approx(
        5e-5
    )  # 10x the paper's, as pre-training
    # from a context-extension run: scaled from the pre-training's lr, not the extension's
    ctx = {
        "lr": 2.2e-3 * paper.TAIL_LR / paper.PEAK_LR,
        "phase": "ctx1",
        "tail_lr_ratio": paper.TAIL_LR / paper.PEAK_LR,
    }
    (tmp_path / "trainer.json").write_text(json.dumps({"config": ctx}))
    assert peak_lr(SFTConfig(init=str(tmp_path), data="x")) == pytest.approx(5e-5)
    assert SFTConfig(init="x", data="x").epochs == 2 and SFTConfig(
        init="x", data="x"
    ).final_lr_ratio == pytest.approx(0.2)


def test_sft_lowers_the_held_out_chat_loss(tok, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "base"
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), ckpt)
    tok.save(ckpt)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "To be, or not to be"},
            ]
        }
    ] * 20
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_sft(SFTConfig(init=str(ckpt), data=str(data), out=str(tmp_path / "sft"), lr=3e-3, batch=4,
                               epochs=2), log=lambda *_: None)  # fmt: skip
    assert result["steps"] == 2 * math.ceil(18 / 4)
    assert result["val_chat_loss_after"] < result["val_chat_loss_before"] - 0.5
    saved = json.loads(
        (tmp_path / "sft" / "checkpoints" / f"step_{result['steps']:08d}" / "trainer.json").read_text()
    )
    assert saved["phase"] == "sft" and saved["config"]["phase"] == "sft"


def test_chat_data_errors_name_file_and_line(tmp_path):
    from dsv3.data.chat import ChatDataError

    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"messages": [{"role": "robot", "content": "a"}]}\n')  # fmt: skip
    with pytest.raises(ChatDataError, match=r"c.jsonl:2: messages\[0\].role"):
        read_conversations(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    with pytest.raises(ChatDataError, match=r"c.jsonl:2: 'completion' must be a string"):
        read_conversations(path)
    path.write_text('{"prompt": "a", "completion": ""}\n')
    with pytest.raises(ChatDataError, match=r"c.jsonl:1: empty 'completion'"):
        read_conversations(path)


def test_synthesised_demo_chats_are_valid_conversations(tok, tmp_path):
    from dsv3.data.chat_synth import synth_main

    out = tmp_path / "chats.jsonl"
    assert synth_main(["--out", str(out), "--n", "60"]) == 0
    conversations = read_conversations(out)
    assert len(conversations) == 60
    kinds = {c[-2]["content"].split()[0] for c in conversations}
    assert {"Write", "Continue", "Which"} <= kinds
    assert any(sum(m["role"] == "assistant" for m in c) == 2 for c in conversations)  # multi-turn
    ids, mask = render(tok, conversations[0])
    assert sum(mask) > 0


def test_sft_command_line(tok, tmp_path, capsys):
    from dsv3.cli import main

    torch.manual_seed(0)
    ckpt = tmp_path / "base"
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), ckpt)
    tok.save(ckpt)
    data = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "To be"}]}
    data.write_text((json.dumps(row) + "\n") * 10)
    argv = ["sft", "--init", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "1",
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 2)[-1])["steps"] == 1
    data.write_text("{not json\n")
    assert main(argv) == 2
    assert "chat.jsonl:1: not valid JSON" in capsys.readouterr().err
