"""--save_every / --resume: a tiny spul.py run killed part-way and resumed ends with exactly the
metrics and prompt of an uninterrupted run with the same seed (CPU); the checkpoint lives in a
hidden sibling of the run folder, is refused when the flags changed, and is removed once the
run folder is complete."""
import json

import pytest
import torch
from safetensors.torch import load_file

import spul
from tests.conftest import write_splits
from utils import training
from utils.cli import checkpoint_dir

# 2 x 10 examples, batch 4: 5 steps per epoch, 2 epochs = 10 steps; checkpoints after steps 3, 6, 9
TINY = ["--num_epochs", "2", "--train_batch_size", "4", "--eval_batch_size", "4", "--lr", "2e-2",
        "--ptuning_num_tokens", "3", "--ptuning_hidden_size", "8", "--max_length", "64", "--beta", "0.5",
        "--save_every", "3"]


class Killed(Exception):
    """Stands for the process dying (the files on disk are what a kill leaves)."""


def dying_train(after_steps):
    def wrapped(model, params, loss_fn, *args, **kwargs):
        calls = {"n": 0}

        def loss(m, batch):
            calls["n"] += 1
            if calls["n"] > after_steps:
                raise Killed
            return loss_fn(m, batch)

        return training.train(model, params, loss, *args, **kwargs)

    return wrapped


def read(path):
    return json.loads(path.read_text())


def tensors(run):
    return {**load_file(str(run / "prompt" / "adapter_model.safetensors")), **load_file(str(run / "prompt_encoder.safetensors"))}


def test_killed_spul_run_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_splits(tmp_path / "data", rows=10)
    base = ["--model_name", tiny_model_dir, "--data_dir", str(data)] + TINY
    ref, out = tmp_path / "runs" / "reference", tmp_path / "runs" / "spul"
    spul.main(base + ["--output_path", str(ref)])
    assert not checkpoint_dir(ref).exists()  # removed once the run folder was complete

    with monkeypatch.context() as m:
        m.setattr(spul, "train", dying_train(after_steps=7))  # dies in step 8; last checkpoint: step 6
        with pytest.raises(Killed):
            spul.main(base + ["--output_path", str(out)])
    ckpt = checkpoint_dir(out)
    assert ckpt.name == ".spul.ckpt" and not out.exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".spul.ckpt", "reference"]  # nothing that looks complete
    assert read(ckpt / "last" / "state.json")["stats"]["steps"] == 6
    assert sorted(p.name for p in (ckpt / "last").iterdir()) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]

    # other flags than the interrupted run: refused before any model is loaded, checkpoint kept
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        spul.main(base + ["--output_path", str(out), "--resume", "--alpha", "0.5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: --resume: the checkpoint in {ckpt} was written by a run with other settings (alpha: 1.0 -> 0.5)")
    assert (ckpt / "last" / "state.json").is_file() and not out.exists()

    spul.main(base + ["--output_path", str(out), "--resume"])
    assert f"spul: resumed from {ckpt} at step 6/10" in capsys.readouterr().out
    assert not ckpt.exists() and out.is_dir()
    assert read(out / "metrics.json") == read(ref / "metrics.json")
    want, got = tensors(ref), tensors(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert read(out / "train_stats.json")["steps"] == read(ref / "train_stats.json")["steps"] == 10
    assert [s[:2] for s in read(out / "train_stats.json")["losses"]] == [s[:2] for s in read(ref / "train_stats.json")["losses"]]


def test_resume_without_a_checkpoint_starts_over_and_a_stale_one_is_announced(tiny_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data", rows=4)
    base = ["--model_name", tiny_model_dir, "--data_dir", str(data), "--num_epochs", "1", "--train_batch_size", "8",
            "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8", "--max_length", "64"]
    spul.main(base + ["--output_path", str(tmp_path / "a"), "--resume"])
    assert f"warning: --resume: no checkpoint in {checkpoint_dir(tmp_path / 'a')}; starting from step 0" in capsys.readouterr().err
    # a checkpoint left by an interrupted run, not asked for: said on one line, then replaced
    stale = checkpoint_dir(tmp_path / "b") / "last"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"stats": {"steps": 2}, "fingerprint": None}))
    spul.main(base + ["--output_path", str(tmp_path / "b")])
    assert "holds a checkpoint of an interrupted run (step 2); starting over (pass --resume to continue it)" in capsys.readouterr().err
    assert (tmp_path / "b" / "metrics.json").is_file() and not checkpoint_dir(tmp_path / "b").exists()
