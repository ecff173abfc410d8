"""Bad input is refused before any model is loaded: one line on stderr that names the flag or
file, exit status 2, no traceback, and nothing created (no output folder, no temporary or
checkpoint sibling). Every entry point is run in-process on tiny CSV splits; loading a model
during these tests fails them (``no_model_loading``)."""
import shutil

import pandas as pd
import pytest

import baselines
import inference_spul
import qlora
import spul
from tests.conftest import write_splits
from tests.tiny import save_tiny_model

ENTRY = {"qlora": qlora.main, "spul": spul.main, "baselines": baselines.main, "inference": inference_spul.main}
TRAINING = ["qlora", "spul", "baselines"]
TINY_SPUL = ["--num_epochs", "1", "--train_batch_size", "8", "--eval_batch_size", "8", "--lr", "1e-2",
             "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8", "--max_length", "64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real SPUL run on its own copy of a tiny base model (made before any test's guard)."""
    root = tmp_path_factory.mktemp("validation_runs")
    base = save_tiny_model(root / "base")
    data = write_splits(root / "data")
    spul.main(["--model_name", base, "--data_dir", str(data), "--output_path", str(root / "spul")] + TINY_SPUL)
    return root


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    import peft
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the input checks finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", boom)


@pytest.fixture
def data(tmp_path):
    return write_splits(tmp_path / "data")


def argv(entry, model, data_dir, out, *extra):
    head = ["--unlearn_method", "gradient_ascent"] if entry == "baselines" else []
    return head + ["--model_name", str(model), "--data_dir", str(data_dir), "--output_path", str(out),
                   "--max_length", "64", *extra]


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(capsys, tmp_path, entry, args):
    """Run the entry point; it must exit 2 with one 'error: ' line and create nothing."""
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ENTRY[entry]([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before, "the refused run created files"
    return err


@pytest.mark.parametrize("entry", ENTRY)
def test_unknown_dataset(entry, tmp_path, capsys):
    args = (["--unlearn_method", "npo"] if entry == "baselines" else []) + ["--dataset", "imdb", "--output_path", tmp_path / "out"]
    err = refused(capsys, tmp_path, entry, args)
    assert "--dataset imdb: unknown dataset" in err and "--data_dir" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_data_folder_missing_a_split(entry, tiny_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data", test_forget=None)
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out"))
    assert f"--data_dir {data}: split 'test_forget' is missing" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_split_missing_a_column(entry, tiny_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data", train_retain=pd.DataFrame({"text": ["a", "b"], "sentiment": [0, 1]}))
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out"))
    assert "train_retain.csv: missing column(s) label" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_label_outside_the_label_set(entry, tiny_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data", test_retain=pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}))
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out"))
    assert "test_retain.csv: label 2 is outside the task's label set" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_empty_split(entry, tiny_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data", train_forget=pd.DataFrame({"text": [], "label": []}))
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out"))
    assert "train_forget.csv: the split is empty" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_forget_size_that_empties_train_forget(entry, tiny_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data", train_forget=pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]}))
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out", "--forget_size", "0.2"))
    # one of the 3 rows goes to val_forget first, so --forget_size sees 2
    assert "--forget_size 0.2: leaves train_forget (2 rows) empty" in err


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_forget_size_out_of_range(entry, value, tiny_model_dir, data, tmp_path, capsys):
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out", "--forget_size", value))
    assert f"--forget_size {float(value)}: must be in (0, 1]" in err


@pytest.mark.parametrize("flag", ["--alpha", "--beta"])
def test_negative_loss_weight(flag, tiny_model_dir, data, tmp_path, capsys):
    err = refused(capsys, tmp_path, "spul", argv("spul", tiny_model_dir, data, tmp_path / "out", flag, "-0.5"))
    assert f"{flag} -0.5: must be >= 0" in err


def test_ptuning_num_tokens_below_one(tiny_model_dir, data, tmp_path, capsys):
    err = refused(capsys, tmp_path, "spul", argv("spul", tiny_model_dir, data, tmp_path / "out", "--ptuning_num_tokens", "0"))
    assert "--ptuning_num_tokens 0: must be at least 1" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_max_length_too_short_for_template_and_label(entry, tiny_model_dir, data, tmp_path, capsys):
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out", "--max_length", "8"))
    assert "--max_length 8: too short to hold the template and the label (need at least" in err


@pytest.mark.parametrize("entry", ["spul", "baselines", "inference"])
def test_checkpoint_folder_that_does_not_exist(entry, tiny_model_dir, data, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out", "--model_checkpoints", missing))
    assert f"--model_checkpoints {missing}: no such folder" in err


@pytest.mark.parametrize("entry", ["spul", "baselines"])
def test_checkpoint_of_the_wrong_kind(entry, runs, data, tmp_path, capsys):
    # a SPUL run where a QLoRA run is expected
    args = (["--unlearn_method", "npo"] if entry == "baselines" else []) + [
        "--model_checkpoints", runs / "spul", "--data_dir", data, "--output_path", tmp_path / "out"]
    err = refused(capsys, tmp_path, entry, args)
    assert f"--model_checkpoints {runs / 'spul'}: is a 'spul' run, expected qlora" in err


def test_folder_that_is_not_a_run(runs, data, tmp_path, capsys):
    err = refused(capsys, tmp_path, "inference", ["--model_checkpoints", runs / "base", "--data_dir", data,
                                                   "--output_path", tmp_path / "out"])
    assert f"--model_checkpoints {runs / 'base'}: not a run folder of this toolkit (no manifest.json)" in err


def test_prompt_whose_manifest_does_not_match_the_model(runs, data, tmp_path, capsys):
    # the base model the prompt was trained on has changed since
    weights = runs / "base" / "model.safetensors"
    keep = tmp_path / "keep.safetensors"
    shutil.copy(weights, keep)
    other = save_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(f"{other}/model.safetensors", weights)
    shutil.rmtree(other)
    try:
        err = refused(capsys, tmp_path, "inference", ["--model_checkpoints", runs / "spul", "--data_dir", data,
                                                       "--output_path", tmp_path / "out"])
    finally:
        shutil.copy(keep, weights)
    assert f"--model_checkpoints {runs / 'spul'}: does not match the model it would be loaded onto" in err
    assert "base model weights sha256" in err and "--force" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_existing_output_folder_without_overwrite(entry, tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, out))
    assert f"--output_path {out}: already exists (pass --overwrite to replace it)" in err


@pytest.mark.parametrize("entry", TRAINING)
def test_resume_still_needs_overwrite_for_an_existing_output(entry, tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, out, "--resume"))
    assert f"--output_path {out}: already exists" in err


def test_unknown_unlearn_method(tiny_model_dir, data, tmp_path, capsys):
    args = argv("baselines", tiny_model_dir, data, tmp_path / "out")
    args[1] = "forget_everything"
    err = refused(capsys, tmp_path, "baselines", args)
    assert "argument --unlearn_method: invalid choice: 'forget_everything'" in err and "gradient_ascent" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_model_name_neither_local_nor_reachable(entry, data, tmp_path, capsys):
    # the test session is offline (HF_HUB_OFFLINE=1), like a compute node without internet
    err = refused(capsys, tmp_path, entry, argv(entry, "no-such-org/no-such-model", data, tmp_path / "out"))
    assert "--model_name no-such-org/no-such-model: not a local folder" in err and "not reachable" in err


@pytest.mark.parametrize("entry, flag, value, why", [
    ("qlora", "--save_every", "-1", "must be >= 0"),
    ("spul", "--save_every", "-5", "must be >= 0"),
    ("baselines", "--save_every", "-1", "must be >= 0"),
    ("spul", "--group_by_length", "-1", "must be >= 0"),
    ("spul", "--ema_decay", "1", "must be in [0, 1)"),
    ("qlora", "--ema_decay", "-0.5", "must be in [0, 1)"),
    ("qlora", "--lora_rank", "0", "--lora_rank must be >= 1"),
    ("spul", "--ptuning_hidden_size", "0", "must be at least 1"),
    ("baselines", "--npo_beta", "0", "must be positive"),
    ("inference", "--eval_batch_size", "0", "must be positive"),
])
def test_other_out_of_range_flags(entry, flag, value, why, tiny_model_dir, data, tmp_path, capsys):
    args = argv(entry, tiny_model_dir, data, tmp_path / "out", flag, value)
    if flag == "--npo_beta":
        args[1] = "npo"
    err = refused(capsys, tmp_path, entry, args)
    assert flag in err and why in err


@pytest.mark.parametrize("entry", ENTRY)
def test_argparse_errors_are_one_line(entry, tmp_path, capsys):
    err = refused(capsys, tmp_path, entry, ["--max_length", "many"])
    assert "argument --max_length: invalid int value: 'many'" in err and "--help" in err


def test_run_folder_without_its_tokenizer(runs, data, tmp_path, capsys):
    broken = tmp_path / "broken_run"
    shutil.copytree(runs / "spul", broken)
    shutil.rmtree(broken / "tokenizer")
    err = refused(capsys, tmp_path, "inference", ["--model_checkpoints", broken, "--data_dir", data,
                                                   "--output_path", tmp_path / "out"])
    assert f"--model_checkpoints {broken}: has no tokenizer/ folder" in err


@pytest.mark.parametrize("entry", ENTRY)
def test_megatron_accelerate_launch_is_refused(entry, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_MEGATRON_LM", "true")  # what `accelerate launch` sets for a Megatron-LM config
    err = refused(capsys, tmp_path, entry, argv(entry, tiny_model_dir, data, tmp_path / "out"))
    assert "accelerate launch: Megatron-LM is not supported (ACCELERATE_USE_MEGATRON_LM is set)" in err


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fsdp_and_deepspeed_launch_configs_are_accepted(var, monkeypatch):
    from utils import cli

    monkeypatch.setenv(var, "true")  # what `accelerate launch` sets for an FSDP or DeepSpeed config
    cli.check_launcher()  # accepted: accelerate shards the training (utils.training)

