"""End to end on a tiny random model: qlora.py writes a complete run folder and
inference_spul.py reads it back (and evaluates the vanilla model)."""
import json

import pytest

import inference_spul
import qlora


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir, sst2_data):
    out = tmp_path_factory.mktemp("runs") / "qlora"
    qlora.main(["--model_name", tiny_model_dir, "--data_root", str(sst2_data), "--dataset", "sst2",
                "--max_per_split", "12", "--max_length", "96", "--num_epochs", "1",
                "--train_batch_size", "8", "--eval_batch_size", "8", "--lr", "1e-3", "--output_path", str(out)])
    return out


def test_qlora_writes_complete_run_folder(qlora_run):
    files = {p.name for p in qlora_run.iterdir()}
    assert {"adapter", "tokenizer", "config.json", "metrics.json", "manifest.json", "train_stats.json"} <= files
    assert (qlora_run / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((qlora_run / "manifest.json").read_text())
    assert manifest["kind"] == "qlora" and manifest["splits"]["train_forget"]["rows"] == 12
    assert len(manifest["adapter_sha256"]) == 64 and manifest["lora_target_modules"] == ["q_proj", "v_proj"]
    metrics = json.loads((qlora_run / "metrics.json").read_text())
    assert set(metrics) == {"train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget"}
    assert all(m["n"] == 12 for m in metrics.values())
    stats = json.loads((qlora_run / "train_stats.json").read_text())
    assert stats["steps"] == 3 and stats["trainable_params"] > 0  # 24 training examples / batch 8
    config = json.loads((qlora_run / "config.json").read_text())
    assert config["lora_rank"] == 16 and config["lora_alpha"] == 64 and config["lora_dropout"] == 0.1


def test_qlora_refuses_existing_folder(qlora_run, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        qlora.main(["--model_name", tiny_model_dir, "--output_path", str(qlora_run)])
    assert e.value.code == 2
    assert "--output_path" in capsys.readouterr().err


def test_lora_fropout_alias_is_accepted():
    args = qlora.build_parser().parse_args(["--lora_fropout", "0.2"])
    assert args.lora_dropout == 0.2


def test_inference_reads_qlora_run_and_vanilla(qlora_run, tiny_model_dir, tiny_data_args, tmp_path):
    out = tmp_path / "eval"
    inference_spul.main(["--model_checkpoints", str(qlora_run), "--output_path", str(out)] + tiny_data_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(m["n"] == 12 for m in metrics.values())
    assert json.loads((out / "manifest.json").read_text())["evaluated"]["kind"] == "qlora"
    van = tmp_path / "vanilla"
    inference_spul.main(["--model_name", tiny_model_dir, "--output_path", str(van)] + tiny_data_args)
    assert json.loads((van / "manifest.json").read_text())["evaluated"]["kind"] == "vanilla"
