import os
from pathlib import Path

import pytest

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
    from utils.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


TINY_DATA_ARGS = ["--dataset", "sst2", "--max_per_split", "12", "--max_length", "96", "--eval_batch_size", "8"]


@pytest.fixture
def tiny_data_args(shared_data):
    return ["--data_root", str(shared_data)] + TINY_DATA_ARGS
