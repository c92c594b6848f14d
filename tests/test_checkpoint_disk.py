"""A full disk during a checkpoint: one clear error naming the directory, no partial directory left,
the earlier checkpoints intact, and the run stops (DiskFullError, a Dsv3Error: `dsv3 train` exits 2).

The real case runs on a small tmpfs (we run as root in CI); where it cannot be mounted those tests
are skipped with the reason, and the error shapes of each writer are checked without a mount."""

from __future__ import annotations

import errno
import subprocess
import uuid

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import DiskFullError, is_disk_full, save_pretrained
from dsv3.errors import Dsv3Error
from dsv3.train.state import list_checkpoints, save_checkpoint, verify_checkpoint

pytestmark = pytest.mark.timeout(120)

SIZE = "6m"  # one `tiny` checkpoint (~4 MiB with its optimizer state) fits, a second one does not


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted under tmp_path (unmounted afterwards), or a skip saying why not."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk case: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk case: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


def _model_and_optimizer_state() -> tuple[Transformer, dict]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300))
    opt = torch.optim.AdamW(model.parameters())
    model.loss(torch.randint(0, 300, (1, 9))).total.backward()
    opt.step()  # moments: the optimizer state is twice the model
    return model, opt.state_dict()


def test_full_disk_during_a_checkpoint_is_one_clear_error_and_keeps_the_previous_one(small_disk):
    model, opt_state = _model_and_optimizer_state()
    root = small_disk / "checkpoints"
    first = save_checkpoint(root, 1, model, opt_state, {"step": 1}, keep_last=2)
    with pytest.raises(DiskFullError) as e:
        save_checkpoint(root, 2, model, opt_state, {"step": 2}, keep_last=2)
    msg = str(e.value)
    assert isinstance(e.value, Dsv3Error) and "\n" not in msg
    assert msg.startswith(f"no space left on {root} (") and "checkpoint step 2" in msg
    assert "unexpected pos" not in msg and "Error while serializing" not in msg
    assert sorted(p.name for p in root.iterdir()) == [first.name]  # no partial .step_00000002.tmp
    verify_checkpoint(first)  # the previous checkpoint is intact
    assert list_checkpoints(root) == [first]


def test_a_run_whose_checkpoint_hits_a_full_disk_stops_with_the_error(small_disk, tmp_path):
    """The documented rule: the run stops at the failed checkpoint with DiskFullError; what was saved
    before stays valid, so `--resume` continues from it once there is space."""
    from dsv3.data.dataset import DataConfig, prepare_data
    from dsv3.train import TrainConfig, Trainer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "a full disk must never cost the checkpoint that was already written".split()
    for d in range(20):
        (corpus / f"d{d}.txt").write_text(" ".join(words[(d + i) % len(words)] for i in range(80)) + ".\n")
    data = prepare_data(
        DataConfig(
            data=str(corpus), vocab_size=300, val_fraction=0.1, cache=str(tmp_path / "cache"), progress=False
        )
    )
    cfg = TrainConfig(
        preset="tiny", steps=4, out=str(small_disk / "run"), data=str(corpus), seq_len=32, micro_batch=1,
        batch_start=1, batch_end=1, eval_every=100, eval_batches=1, ckpt_every=1, keep_last=2,
        precision="fp32", tensorboard=False, val_fraction=0.1,
    )  # fmt: skip
    trainer = Trainer(cfg, dataset=data, show_progress=False)
    with pytest.raises(DiskFullError, match="no space left on"):
        trainer.fit()
    ckpts = small_disk / "run" / "checkpoints"
    assert trainer.step == 2  # step 1 was saved; the save after step 2 found the disk full
    assert [p.name for p in ckpts.iterdir()] == ["step_00000001"]
    verify_checkpoint(ckpts / "step_00000001")


def test_every_writer_s_full_disk_error_is_recognised():
    # what each writer raised on a full tmpfs (observed): Python's OSError, safetensors' text,
    # torch.save's "unexpected pos" with the OSError kept as its context
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            ) from None
    except RuntimeError as wrapped:
        wrapped.__suppress_context__ = False
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("unexpected pos 1 vs 2"))


def test_save_pretrained_on_a_full_disk_leaves_no_tmp_file(small_disk):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300))
    (small_disk / "filler").write_bytes(b"\0" * (6 * 2**20 - 512 * 1024))  # leave ~0.5 MiB
    with pytest.raises(DiskFullError, match=f"no space left on {small_disk / 'out'} .*model.safetensors"):
        save_pretrained(model, small_disk / "out")
    assert not any(p.name.endswith(".tmp") for p in (small_disk / "out").iterdir())
