"""--report_to none|tensorboard|wandb (utils/trackers.py): tiny runs whose tracker logs hold the
same losses, loss terms and accuracies as the run folder; wandb offline (no account, no network);
none writes nothing; bad choices refused with one line before any model loads."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

import baselines
import qlora
import spul
from utils import trackers
from utils.trackers import flatten_metrics

SPUL_ARGS = ["--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-2",
             "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "16"]
SPUL_TERMS = ("L_f", "L_r", "L_kl", "loss")  # utils.spul_loss.spul_loss


def read(path):
    return json.loads(Path(path).read_text())


def run_spul(model, data_args, out, *extra):
    spul.main(["--model_name", model, "--output_path", str(out), *SPUL_ARGS, *data_args, *map(str, extra)])
    return out


def scalars(folder) -> dict:
    """{tag: [(step, value)]} of the event files directly in ``folder`` (not the hparams subfolder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def cosine_lr(peak, step, total, warmup):
    """The rate optimiser step ``step`` (1-based) uses under transformers' cosine schedule."""
    k = step - 1
    if k < warmup:
        return peak * k / max(1, warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup)))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb's own cache/config files go to tmp; WANDB_MODE unset (restored afterwards)."""
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "unset-by-test")
    monkeypatch.delenv("WANDB_MODE")  # recorded as absent: restored to absent at teardown
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_tensorboard_scalars_match_the_run_folder(tiny_model_dir, tiny_data_args, tmp_path):
    out = run_spul(tiny_model_dir, tiny_data_args, tmp_path / "run", "--report_to", "tensorboard", "--run_name", "tb")
    folder = tmp_path / "run.trackers" / "tb"
    assert list(folder.glob("events.out.tfevents.*")), sorted(p.name for p in folder.parent.rglob("*"))
    assert read(out / "config.json")["tracker_dir"] == str(tmp_path / "run.trackers")
    tags = scalars(folder)
    stats = read(out / "train_stats.json")
    last = stats["steps"]
    assert stats["losses"] and stats["losses"][-1][0] == last
    assert tags["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v, _ in stats["losses"]]
    for term in SPUL_TERMS:
        assert tags[f"loss_terms/{term}"] == [(s, pytest.approx(t[term], rel=1e-6, abs=1e-12)) for s, _, t in stats["losses"]]
    total = last  # 24 training samples, step batch 8, 1 epoch
    assert tags["train/lr"] == [(s, pytest.approx(cosine_lr(1e-2, s, total, int(0.1 * total)), rel=1e-6))
                                for s, _, _ in stats["losses"]]
    metrics = read(out / "metrics.json")
    assert set(metrics) == {"train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget"}
    for split, m in metrics.items():
        assert tags[f"eval/{split}/accuracy"] == [(last, pytest.approx(m["accuracy"], rel=1e-6, abs=1e-6))]
        assert tags[f"eval/{split}/f1"] == [(last, pytest.approx(m["f1"], rel=1e-6, abs=1e-6))]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def wandb_records(path):
    """The protobuf records of an offline ``.wandb`` file (LevelDB log format: a 7-byte file
    header, 32 KiB blocks of chunks each with a crc32/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = Path(path).read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, buf, out = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            out.append(rec)
            buf = b""
        elif kind in (2, 3):  # first, middle
            buf += chunk
    return out


def test_wandb_offline_run_holds_the_history(tiny_model_dir, tiny_data_args, tmp_path, wandb_env):
    import os

    out = run_spul(tiny_model_dir, tiny_data_args, tmp_path / "run", "--report_to", "wandb",
                   "--tracker_dir", tmp_path / "logs", "--run_name", "wb", "--tracker_project", "spul-test")
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "logs").rglob("*"))
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == ("wb", "spul-test")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    stats, metrics = read(out / "train_stats.json"), read(out / "metrics.json")
    for step, loss, terms in stats["losses"]:
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-9)
        assert history[step]["train/lr"] > 0
        for term in SPUL_TERMS:
            assert history[step][f"loss_terms/{term}"] == pytest.approx(terms[term], rel=1e-9, abs=1e-15)
    last = history[stats["steps"]]
    for split, m in metrics.items():
        assert last[f"eval/{split}/accuracy"] == pytest.approx(m["accuracy"]) and last[f"eval/{split}/f1"] == pytest.approx(m["f1"])
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["eval/test_forget/accuracy"] == pytest.approx(metrics["test_forget"]["accuracy"])
    assert read(out / "config.json")["report_to"] == "wandb"


def test_report_to_none_writes_nothing_and_changes_no_metric(tiny_model_dir, tiny_data_args, tmp_path):
    plain = run_spul(tiny_model_dir, tiny_data_args, tmp_path / "plain")
    none = run_spul(tiny_model_dir, tiny_data_args, tmp_path / "none", "--report_to", "none")
    assert (none / "metrics.json").read_bytes() == (plain / "metrics.json").read_bytes()
    assert read(none / "train_stats.json")["losses"] == read(plain / "train_stats.json")["losses"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none", "plain"]  # no .trackers folder
    assert not [p for p in tmp_path.rglob("*") if "tfevents" in p.name or "wandb" in p.name]
    config = read(none / "config.json")
    assert config["report_to"] == "none" and config["tracker_dir"] is None


@pytest.mark.parametrize("entry", ["qlora", "baselines"])
def test_other_entry_points_log_every_recorded_step(entry, tiny_model_dir, tiny_data_args, tmp_path):
    out = tmp_path / entry
    common = ["--model_name", tiny_model_dir, "--num_epochs", "1", "--lr", "1e-3", "--output_path", str(out),
              "--report_to", "tensorboard", "--run_name", "tb"] + tiny_data_args
    if entry == "qlora":
        qlora.main(common + ["--train_batch_size", "8"])
        term, warmup = "ce", 0.05
    else:  # log_every 1: one entry per step
        baselines.main(common + ["--unlearn_method", "gradient_ascent_descent", "--train_batch_size", "4"])
        term, warmup = "retain_ce", 0.05
    tags = scalars(tmp_path / f"{entry}.trackers" / "tb")
    stats = read(out / "train_stats.json")
    assert tags["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v, _ in stats["losses"]]
    assert tags[f"loss_terms/{term}"] == [(s, pytest.approx(t[term], rel=1e-6)) for s, _, t in stats["losses"]]
    total = stats["steps"]
    assert [s for s, _ in tags["train/lr"]] == [s for s, _, _ in stats["losses"]]
    assert tags["train/lr"] == [(s, pytest.approx(cosine_lr(1e-3, s, total, int(warmup * total)), rel=1e-6, abs=1e-12))
                                for s, _, _ in stats["losses"]]
    if entry == "baselines":
        assert len(stats["losses"]) == total > 1
    for split, m in read(out / "metrics.json").items():
        assert tags[f"eval/{split}/accuracy"] == [(total, pytest.approx(m["accuracy"], rel=1e-6, abs=1e-6))]


def refused(capsys, main, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_before_any_model(report_to, tiny_data_args, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == report_to else real(name, *a, **k))
    monkeypatch.setattr("utils.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for main in (spul.main, qlora.main):
        err = refused(capsys, main, ["--model_name", str(tmp_path / "no-such-model"), "--output_path", str(tmp_path / "run"),
                                     "--report_to", report_to] + tiny_data_args)
        version = trackers.PACKAGES[report_to][1]
        assert f"--report_to {report_to}" in err and f"pip install {report_to}=={version}" in err, err
    assert not list(tmp_path.iterdir())


def test_bad_choice_and_unwritable_tracker_dir(tiny_model_dir, tiny_data_args, tmp_path, capsys):
    err = refused(capsys, spul.main, ["--model_name", tiny_model_dir, "--report_to", "mlflow"] + tiny_data_args)
    assert "--report_to" in err and "invalid choice" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = refused(capsys, spul.main, ["--model_name", tiny_model_dir, "--output_path", str(tmp_path / "run"),
                                      "--report_to", "tensorboard", "--tracker_dir", str(blocker / "logs")] + tiny_data_args)
    assert err.startswith(f"error: --tracker_dir {blocker / 'logs'}: not writable"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_flatten_metrics_and_tracker_flags_are_not_part_of_the_fingerprint():
    from utils import cli

    flat = flatten_metrics({"test_forget": {"n": 12, "accuracy": 50.0, "predictions": {"generic": 3}, "ok": True,
                                            "nan": float("nan"), "name": "x"}})
    assert flat == {"eval/test_forget/n": 12, "eval/test_forget/accuracy": 50.0, "eval/test_forget/predictions/generic": 3}
    assert set(trackers.TRACKER_FLAGS) <= set(cli.UNBOUND)  # a resumed run may change where it logs
    assert trackers.Trackers(type("C", (), {"report_to": "none"})()).accelerator_kwargs() == {}
