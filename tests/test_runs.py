"""Run folders are all-or-nothing: written in a hidden temporary sibling and renamed into place
only when complete. An exception, Ctrl-C or SIGTERM while writing leaves no folder that looks
complete (and an existing folder being replaced stays as it was); run folders and checkpoints
hold safetensors and JSON, nothing pickled."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import spul
from tests.conftest import write_splits
from utils.runs import atomic_run_dir

REPO = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz"}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_nothing(stop, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(stop):
        with atomic_run_dir(out) as tmp:
            (tmp / "manifest.json").write_text("{}")
            raise stop()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt):
        with atomic_run_dir(out, overwrite=True) as tmp:
            (tmp / "metrics.json").write_text('{"new": true}')
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}


def test_sigterm_while_writing_removes_the_temporary_folder(tmp_path):
    """A scheduler's SIGTERM in an entry point becomes SystemExit(143): the temporary folder goes."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from utils import cli
        from utils.runs import atomic_run_dir

        @cli.entry_point
        def main(argv=None):
            with atomic_run_dir(Path({str(tmp_path / 'run')!r})) as tmp:
                (tmp / "manifest.json").write_text("{{}}")
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("not reached")

        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_crash_while_saving_a_spul_run_keeps_only_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    data = write_splits(tmp_path / "data", rows=4)
    runs = tmp_path / "runs"
    args = ["--model_name", tiny_model_dir, "--data_dir", str(data), "--num_epochs", "2", "--train_batch_size", "4",
            "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8", "--max_length", "64", "--save_every", "1"]

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(spul, "save_run", ctrl_c)  # Ctrl-C after the prompt and tokenizer were written
        with pytest.raises(KeyboardInterrupt):
            spul.main(args + ["--output_path", str(runs / "spul")])
    assert sorted(p.name for p in runs.iterdir()) == [".spul.ckpt"]  # resumable, nothing that looks complete

    spul.main(args + ["--output_path", str(runs / "spul"), "--resume"])
    assert sorted(p.name for p in runs.iterdir()) == ["spul"]
    files = [p for p in (runs / "spul").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".jsonl", ".safetensors", ".md", ".jinja"}, sorted({p.suffix for p in files})
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert not any(p.suffix == ".json" and p.name.startswith(".") for p in files)


def test_checkpoints_are_safetensors_and_json(tiny_model_dir, tmp_path):
    from tests.test_training import features, loss_fn, make_model
    from utils.training import TrainConfig, train

    model = make_model()
    train(model, model.parameters(), loss_fn, features(8), TrainConfig(lr=1e-3, num_epochs=2, batch_size=4,
          checkpoint_dir=str(tmp_path / "ck"), save_every=1), "cpu", 0)
    files = sorted(p.name for p in (tmp_path / "ck").rglob("*") if p.is_file())
    assert files == ["optimizer.safetensors", "state.json", "trainable.safetensors"]
    assert os.listdir(tmp_path / "ck") == ["last"]  # no temporary or previous checkpoint left behind
