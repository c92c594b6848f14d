"""`dsv3 distill-mtp` (dsv3.train.mtp_distill): the MTP targets are the continuation's tokens two
ahead, only MTP module 1 trains (the main model stays bit-identical, so greedy outputs cannot
change), training raises the draft's agreement with the main model's greedy tokens, and the command
writes a loadable checkpoint whose main-model weights equal the input's."""

import json

import pytest
import torch
from serve_util import make_ckpt

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import load_pretrained
from dsv3.train.mtp_distill import IGNORE, agreement, distill, distill_mtp_main, mtp_targets


def test_targets_are_the_generated_tokens_two_ahead():
    seqs = torch.arange(10)[None] + 100  # prompt 100..103, continuation 104..109
    ids, next_ids, targets = mtp_targets(seqs, prompt_len=4)
    assert ids.tolist() == [list(range(100, 109))]
    assert next_ids[0, :8].tolist() == list(range(101, 109))  # position i reads t_{i+1}
    # position i predicts t_{i+2}: a target only when t_{i+2} is generated (i + 2 >= 4); none at the end
    assert targets.tolist() == [[IGNORE, IGNORE, 104, 105, 106, 107, 108, 109, IGNORE]]


def _greedy(model: Transformer, prompts: torch.Tensor, new: int) -> torch.Tensor:
    seqs = prompts
    with torch.no_grad():
        for _ in range(new):
            seqs = torch.cat([seqs, model(seqs)[:, -1:].argmax(-1)], dim=1)
    return seqs


def test_only_the_mtp_module_trains_and_agreement_rises(tiny):
    torch.manual_seed(0)
    model = Transformer(tiny).eval()
    seqs = _greedy(model, torch.randint(0, tiny.vocab_size, (24, 4)), 12)  # the model's own continuations
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    before = agreement(model, seqs, 4)
    losses = distill(model, seqs, 4, steps=40, batch=8, lr=3e-3, progress=False)
    after = agreement(model, seqs, 4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # main model unchanged
    assert any(
        not torch.equal(p, q) for p, q in zip(Transformer(tiny).mtp.parameters(), model.mtp.parameters())
    )
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert after > before + 0.2, (before, after)


def test_command_writes_a_checkpoint_with_the_same_main_model(tmp_path, capsys):
    src = make_ckpt(tmp_path / "src")
    out = tmp_path / "out"
    args = ["--out", str(out), "--sequences", "12", "--held-out", "4", "--prompt-len", "4", "--new", "8"]
    assert distill_mtp_main([str(src), *args, "--steps", "3", "--batch", "4", "--threads", "1"]) == 0
    report = json.loads((out / "distill_mtp.json").read_text())
    assert report["sequences"] == 8 and report["held_out"] == 4 and report["steps"] == 3
    assert 0.0 <= report["agreement_before"] <= 1.0 and "MTP draft agreement" in capsys.readouterr().out
    a, b = load_pretrained(src), load_pretrained(out)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("mtp."))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("mtp."))
    assert (out / "tokenizer.json").exists()


def test_command_rejects_bad_arguments(tmp_path, capsys):
    src = make_ckpt(tmp_path / "src")
    with pytest.raises(SystemExit):
        distill_mtp_main([str(src), "--out", str(tmp_path / "o"), "--sequences", "4", "--held-out", "4"])
    assert "--held-out: 4 must be below --sequences (4)" in capsys.readouterr().err
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        distill_mtp_main([str(src), "--out", str(tmp_path / "o")])
    assert "has no MTP module" in capsys.readouterr().err
    assert ModelConfig.from_preset("tiny").n_mtp_layers == 1  # the preset the other tests rely on
