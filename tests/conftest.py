import os
from pathlib import Path

import pytest

# The tests run tiny models, for which one intra-op thread is fastest; on a shared 2-core
# machine OpenMP's spinning thread pool makes a 0.02 ms matmul take ~10 ms when other jobs
# hold the cores. Set before torch is imported; launched subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPUL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
    """The offline copy of the paper's splits, for the tests about that data itself."""
    if not (SHARED_DATA / "sst2").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sst2_data(tmp_path_factory):
    """A data root holding ``sst2`` splits for the end-to-end tests, which read 12 rows a split:
    the offline copy where there is one, else made-up reviews in the same files and columns
    (seeded), so that a clean clone (CI) runs these tests too instead of skipping them."""
    if (SHARED_DATA / "sst2").is_dir():
        return SHARED_DATA
    return write_synthetic_sst2(tmp_path_factory.mktemp("sst2_synthetic"))


def write_synthetic_sst2(root: Path) -> Path:
    import random

    import pandas as pd

    rng = random.Random(0)
    good, bad = ["good", "great", "fun", "moving", "sharp", "warm"], ["bad", "dull", "flat", "weak", "tired", "cold"]
    people = ["tom hanks", "meg ryan", "jim carrey", "ian mckellen"]  # the forget set: reviews naming them
    subjects = ["the film", "this movie", "the plot", "the cast", "the script", "the ending"]

    def review(label, person=None):
        words = rng.sample(good if label else bad, 2)
        who = f"{person} is" if person else f"{rng.choice(subjects)} is"
        return f"{who} {words[0]} and {words[1]}"

    def rows(n, forget):
        out = []
        for i in range(n):
            label = i % 2
            out.append({"text": review(label, rng.choice(people) if forget else None), "label": label,
                        "label_text": "positive" if label else "negative"})
        return pd.DataFrame(out)

    folder = root / "sst2" / "unlearning_sst2_v3"
    folder.mkdir(parents=True)
    for split, n, forget in [("train_retain", 80, False), ("train_forget", 40, True), ("test_retain", 40, False),
                             ("test_forget", 24, True)]:
        rows(n, forget).to_csv(folder / f"{split}.csv", index=False)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never let a test write into the user's cache; the embedded build reuses the real one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with an offline tokenizer, saved like a real model folder."""
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


TINY_DATA_ARGS = ["--dataset", "sst2", "--max_per_split", "12", "--max_length", "96", "--eval_batch_size", "8"]


@pytest.fixture
def tiny_data_args(sst2_data):
    return ["--data_root", str(sst2_data)] + TINY_DATA_ARGS


SPLIT_NAMES = ("train_retain", "train_forget", "test_retain", "test_forget")


def write_splits(folder, rows=8, **frames):
    """Four tiny CSV splits (``text,label``, labels alternating) in ``folder``; a keyword
    ``split=DataFrame`` replaces that split, ``split=None`` leaves it out. Returns the folder."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_NAMES:
        df = frames.get(split, pd.DataFrame({
            "text": [f"{split} review {i}: {'quite good fun' if i % 2 else 'rather dull and bad'}" for i in range(rows)],
            "label": [i % 2 for i in range(rows)],
        }))
        if df is not None:
            df.to_csv(folder / f"{split}.csv", index=False)
    return folder
