"""An FSDP launch config is accepted by every entry point, as far as CPU allows: accelerate
enables FSDP on GPUs only, so one CPU process with the variables `accelerate launch` sets for an
FSDP config must run each entry point to the end instead of refusing it."""
import pytest

import baselines
import inference_spul
import qlora
import spul
from tests.conftest import write_splits

ENTRY = {"qlora": qlora.main, "spul": spul.main, "baselines": baselines.main, "inference": inference_spul.main}
EXTRA = {
    "qlora": ["--num_epochs", "1", "--train_batch_size", "8", "--no_quantize", "--save_every", "0"],
    "spul": ["--num_epochs", "1", "--train_batch_size", "8", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8",
             "--save_every", "0"],
    "baselines": ["--unlearn_method", "gradient_ascent_descent", "--num_epochs", "1", "--train_batch_size", "8"],
    "inference": [],
}


@pytest.mark.parametrize("entry", ENTRY)
def test_every_entry_point_runs_under_an_fsdp_launch_config(entry, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    data = write_splits(tmp_path / "data")
    out = tmp_path / "out"
    ENTRY[entry](["--model_name", str(tiny_model_dir), "--data_dir", str(data), "--max_length", "64",
                  "--output_path", str(out), *EXTRA[entry]])
    assert (out / "metrics.json").is_file()
