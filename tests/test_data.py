"""Dataset resolution, --forget_size, caps and generic labels."""
from types import SimpleNamespace

import pandas as pd
import pytest

from utils.data import (
    DataError,
    apply_caps,
    generic_labels,
    load_splits,
    prepare_splits,
    read_split_folder,
    stratified_cap,
    subsample_forget,
)
from utils.template import GENERIC_LABELS


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
    args = SimpleNamespace(dataset="custom", data_dir=str(d), data_root=None, forget_size=0.5, seed=0,
                           max_per_split=10, max_train_retain=None, max_train_forget=None,
                           max_test_retain=6, max_test_forget=None)
    splits = prepare_splits(args)
    assert {k: len(v) for k, v in splits.items()} == {
        "train_retain": 10, "train_forget": 10, "test_retain": 6, "test_forget": 10}
