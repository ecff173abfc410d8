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
    if not (SHARED_DATA / "sst2").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


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
def tiny_data_args(shared_data):
    return ["--data_root", str(shared_data)] + TINY_DATA_ARGS


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
