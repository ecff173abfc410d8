"""Dataset resolution, --forget_size, caps and generic labels."""
from types import SimpleNamespace

import pandas as pd
import pytest

from utils.data import (
    DataError,
    apply_caps,
    load_splits,
    prepare_splits,
    read_split_folder,
    stratified_cap,
    subsample_forget,
    unused_retain,
)
from utils.cli import data_config
from utils.task import SENTIMENT

GENERIC_LABELS = SENTIMENT.generic_labels


def generic_labels(n, seed):
    return SENTIMENT.generic_for(n, seed)


def frame(n, pos_share=0.5):
    k = int(n * pos_share)
    return pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": [1] * k + [0] * (n - k)})


def write_folder(folder, n=10, ext="csv", drop=None, bad_label=False):
    folder.mkdir(parents=True, exist_ok=True)
    for s in ("train_retain", "train_forget", "test_retain", "test_forget"):
        if s == drop:
            continue
        df = frame(n)
        if bad_label and s == "test_forget":
            df.loc[0, "label"] = 2
        {"csv": lambda p: df.to_csv(p, index=False), "jsonl": lambda p: df.to_json(p, orient="records", lines=True),
         "parquet": lambda p: df.to_parquet(p)}[ext](folder / f"{s}.{ext}")
    return folder


def test_forget_size_keeps_seeded_share_only_of_forget():
    df = frame(100)
    a = subsample_forget(df, 0.25, seed=1)
    assert len(a) == 25 and a.equals(subsample_forget(df, 0.25, seed=1))
    assert not a.equals(subsample_forget(df, 0.25, seed=2))
    assert subsample_forget(df, 1.0, seed=1) is df
    with pytest.raises(DataError, match="--forget_size"):
        subsample_forget(df, 0.001, seed=1)  # int(0.1) == 0 rows
    with pytest.raises(DataError, match="--forget_size"):
        subsample_forget(df, 1.5, seed=1)


def test_stratified_cap_keeps_label_proportions():
    df = frame(1000, pos_share=0.3)
    c = stratified_cap(df, 100, seed=0)
    assert len(c) == 100 and c["label"].sum() == 30
    assert c.equals(stratified_cap(df, 100, seed=0))
    assert stratified_cap(df, 5000, seed=0) is df


def test_generic_labels_seeded_and_from_generic_set():
    a = generic_labels(50, seed=3)
    assert a == generic_labels(50, seed=3)
    assert a != generic_labels(50, seed=4)
    assert set(a) <= set(GENERIC_LABELS) and len(set(a)) == 2
    assert SENTIMENT.generic_for(5, seed=3, fixed="unknown") == ["unknown"] * 5  # --generic_label: one for all
    with pytest.raises(ValueError, match="not a generic label"):
        SENTIMENT.generic_for(5, seed=3, fixed="positive")


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_read_split_folder_formats(tmp_path, ext):
    splits = read_split_folder(write_folder(tmp_path / "d", ext=ext))
    assert list(splits["train_retain"].columns) == ["text", "label", "label_text"]
    assert splits["train_retain"]["label_text"].tolist()[:1] == ["positive"]


def test_read_split_folder_errors(tmp_path):
    with pytest.raises(DataError, match="split 'test_retain' is missing"):
        read_split_folder(write_folder(tmp_path / "a", drop="test_retain"))
    with pytest.raises(DataError, match="outside the task's label set"):
        read_split_folder(write_folder(tmp_path / "b", bad_label=True))
    (tmp_path / "c").mkdir()
    pd.DataFrame({"sentence": ["x"], "label": [0]}).to_csv(tmp_path / "c" / "train_retain.csv", index=False)
    with pytest.raises(DataError, match="missing column"):
        read_split_folder(tmp_path / "c")
    with pytest.raises(DataError, match="no such folder"):
        read_split_folder(tmp_path / "nope")


def test_sst2_from_data_root_has_paper_counts(shared_data):
    splits = load_splits("sst2", data_root=str(shared_data))
    assert {k: len(v) for k, v in splits.items()} == {
        "train_retain": 46331, "train_forget": 1425, "test_retain": 19855, "test_forget": 610}


def test_prepare_splits_applies_forget_size_then_caps(tmp_path):
    d = write_folder(tmp_path / "d", n=40)
    args = SimpleNamespace(dataset="custom", data_dir=str(d), data_root=None, forget_size=0.5, seed=0, data_seed=0,
                           val_fraction=0.0, max_per_split=10, max_train_retain=None, max_train_forget=None,
                           max_test_retain=6, max_test_forget=None, max_val_retain=None, max_val_forget=4)
    splits = prepare_splits(data_config(args))
    # val_retain takes --max_per_split (10) and val_forget its own cap (4) out of the 40 training
    # rows; --forget_size then halves the 36 forget rows left (18), and the cap keeps 10
    assert {k: len(v) for k, v in splits.items()} == {
        "train_retain": 10, "train_forget": 10, "val_retain": 10, "val_forget": 4, "test_retain": 6, "test_forget": 10}


def _args(d, **kw):
    base = dict(dataset="custom", data_dir=str(d), data_root=None, forget_size=1.0, seed=0, data_seed=0,
                val_fraction=0.25, max_per_split=None, eval_splits=None)
    base.update({f"max_{s}": None for s in ("train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget")})
    base.update(kw)
    return SimpleNamespace(**base)


def _texts(df):
    return set(df["text"])


def test_validation_is_carved_out_of_train_stratified_and_disjoint(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for s in ("train_retain", "train_forget", "test_retain", "test_forget"):
        df = frame(40, pos_share=0.25)  # 10 positive, 30 negative
        df["text"] = [f"{s} {t}" for t in df["text"]]
        df.to_csv(d / f"{s}.csv", index=False)
    splits = prepare_splits(data_config(_args(d)))
    assert len(splits["val_retain"]) == 10 and len(splits["val_forget"]) == 10  # ceil(0.25 * 40)
    assert len(splits["train_retain"]) == 30 and len(splits["train_forget"]) == 30
    assert splits["val_forget"]["label"].sum() == 2 or splits["val_forget"]["label"].sum() == 3  # 25% positive
    for side in ("retain", "forget"):
        val, train = _texts(splits[f"val_{side}"]), _texts(splits[f"train_{side}"])
        assert not val & train  # never trained on
        assert val | train == {f"train_{side} t{i}" for i in range(40)}  # carved from the train pool
        assert not val & (_texts(splits["test_retain"]) | _texts(splits["test_forget"]))


def test_validation_and_caps_follow_data_seed_not_seed(tmp_path):
    d = write_folder(tmp_path / "d", n=40)
    a = prepare_splits(data_config(_args(d, seed=1, max_per_split=8)))
    b = prepare_splits(data_config(_args(d, seed=2, max_per_split=8)))
    c = prepare_splits(data_config(_args(d, seed=1, data_seed=5, max_per_split=8)))
    for s in a:
        assert a[s].equals(b[s])  # a --seed sweep sees the same rows
    assert any(not a[s].equals(c[s]) for s in ("val_retain", "train_retain", "val_forget"))
    # the training caps draw from what the carve left
    assert not _texts(a["val_retain"]) & _texts(a["train_retain"])


def test_eval_splits_without_test_drops_them_at_load(tmp_path):
    d = write_folder(tmp_path / "d", n=20)
    full = prepare_splits(data_config(_args(d)))
    sel = prepare_splits(data_config(_args(d, eval_splits=["train_forget", "val_retain", "val_forget"])))
    assert "test_retain" not in sel and "test_forget" not in sel
    for s in ("train_retain", "train_forget", "val_retain", "val_forget"):
        assert sel[s].equals(full[s])  # dropping test changes nothing else


def test_validation_too_large_is_one_clear_error(tmp_path):
    d = write_folder(tmp_path / "d", n=6)
    with pytest.raises(DataError, match="max_val_forget"):
        prepare_splits(data_config(_args(d, max_val_forget=6)))
    assert "val_retain" not in prepare_splits(data_config(_args(d, val_fraction=0.0)))


def test_eval_splits_limits_what_is_evaluated(tmp_path, tiny_model_dir):
    """--eval_splits names the splits that are evaluated (train splits stay loaded for training)."""
    import json

    import inference_spul

    d = write_folder(tmp_path / "d", n=8)
    out = tmp_path / "eval"
    inference_spul.main(["--model_name", str(tiny_model_dir), "--data_dir", str(d), "--max_length", "64",
                         "--eval_splits", "val_forget", "train_forget", "--output_path", str(out)])
    assert list(json.loads((out / "metrics.json").read_text())) == ["train_forget", "val_forget"]


def test_unused_retain_comes_from_the_rows_no_split_holds(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("train_retain", "train_forget", "test_retain", "test_forget"):
        df = frame(40)
        df["text"] = [f"{name} {t}" for t in df["text"]]
        if name == "train_retain":  # a duplicate of a row the cap may keep: never drawn
            df.loc[39, "text"] = df.loc[0, "text"]
        df.to_csv(d / f"{name}.csv", index=False)
    args = lambda **kw: _args(d, val_fraction=0.0, max_val_retain=10, max_val_forget=4, max_train_retain=10, **kw)  # noqa: E731
    config = data_config(args())
    splits = prepare_splits(config)
    used = set().union(*(_texts(splits[s]) for s in ("train_retain", "train_forget", "val_retain", "val_forget")))
    spare = unused_retain(config, 12)
    assert len(spare) == 12 and spare["text"].is_unique
    assert not _texts(spare) & used  # never a trained, validation or duplicate row
    assert _texts(spare) <= {f"train_retain t{i}" for i in range(40)}  # the training pool's retain side
    # seeded by --data_seed only, and the same whether or not the test splits are loaded
    assert spare.equals(unused_retain(data_config(args(seed=7)), 12))
    assert spare.equals(unused_retain(data_config(args(eval_splits=["train_retain", "train_forget", "val_retain", "val_forget"])), 12))
    assert not spare.equals(unused_retain(data_config(args(data_seed=3)), 12))
    pool = [f"train_retain t{i}" for i in range(39)] + ["train_retain t0"]
    free = sum(t not in used for t in pool)
    assert free == 19  # 40 - 10 validation - 10 trained - the twin of a row the cap or the carve took
    assert len(unused_retain(config, free)) == free
    with pytest.raises(DataError, match="--pseudo_retain 41"):
        unused_retain(config, 41)
    with pytest.raises(DataError, match="--pseudo_retain 1: the training pool has 0"):  # no cap: nothing is left over
        unused_retain(data_config(_args(d, val_fraction=0.1)), 1)
