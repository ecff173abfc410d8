"""spul.py --hard_prefix instruction: the instruction_prompt baseline's text (naming the forgotten
people) as fixed tokens before the soft prompt. The prompt function on small tensors, and end
to end on the tiny model: the prefix is saved and bound by hashes, inference_spul.py rebuilds
exactly the prompt spul.py evaluated with, and bad input is refused in one line."""
import json

import pytest
import torch

import inference_spul
import spul
from tests.conftest import write_splits
from tests.test_augment import forget_frame
from utils.guardrails import instruction_text, prefix_embeddings, prefix_ids
from utils.kinds import load_run
from utils.models import load_tokenizer
from utils.prompt import with_hard_prefix
from utils.task import SENTIMENT

THREE = ["Woody Allen", "Spielberg", "Godard"]


def test_with_hard_prefix_puts_the_fixed_rows_first_and_trains_only_the_soft_ones():
    soft = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    fixed = torch.tensor([[9.0, 8.0], [7.0, 6.0], [5.0, 4.0]])
    fn = with_hard_prefix(lambda model: soft * 2, fixed)
    out = fn(None)
    assert out.shape == (5, 2)
    assert torch.equal(out[:3], fixed) and torch.equal(out[3:], soft.detach() * 2)
    out.sum().backward()
    assert torch.equal(soft.grad, torch.full((2, 2), 2.0))
    base = lambda model: soft  # noqa: E731
    assert with_hard_prefix(base, None) is base


def _args(tiny_model_dir, folder):
    return ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--max_length", "64", "--num_epochs", "1",
            "--train_batch_size", "8", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8", "--lr", "1e-2",
            "--eval_batch_size", "8"]


def test_spul_with_the_instruction_prefix_end_to_end(tmp_path, tiny_model_dir, capsys):
    folder = write_splits(tmp_path / "d", train_forget=forget_frame())
    args = _args(tiny_model_dir, folder)
    with pytest.raises(SystemExit) as e:  # no manifest and no --forget_names: one line, nothing written
        spul.main(args + ["--hard_prefix", "instruction", "--output_path", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--forget_names" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()

    run = tmp_path / "hp"
    spul.main(args + ["--hard_prefix", "instruction", "--forget_names", *THREE, "--output_path", str(run)])
    manifest = json.loads((run / "manifest.json").read_text())
    hard = manifest["hard_prefix"]
    text = instruction_text(THREE, SENTIMENT)
    assert hard["kind"] == "instruction" and (run / hard["prefix"]).read_text(encoding="utf-8") == text
    assert hard["prefix_tokens"] == len(prefix_ids(load_tokenizer(tiny_model_dir, set_pad_id=True), text))

    # inference rebuilds prefix + soft prompt: the same metrics as spul.py's own evaluation
    inference_spul.main(["--model_checkpoints", str(run), "--output_path", str(tmp_path / "ev"),
                         "--data_dir", str(folder), "--max_length", "64", "--eval_batch_size", "8"])
    trained = json.loads((run / "metrics.json").read_text())
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again == trained
    loaded = load_run(run, torch.device("cpu"))  # the prompt it evaluates with: the prefix's rows, then the soft ones
    expected = prefix_embeddings(loaded.model, loaded.tokenizer, text)
    assert loaded.prompt.shape[0] == hard["prefix_tokens"] + 2
    assert torch.equal(loaded.prompt[: hard["prefix_tokens"]], expected)

    # the plain run (no prefix) records none and differs in what it evaluates with
    plain = tmp_path / "plain"
    spul.main(args + ["--output_path", str(plain)])
    assert json.loads((plain / "manifest.json").read_text())["hard_prefix"] is None
    assert not (plain / "prefix.txt").exists()

    # a changed prefix file is refused in one line
    (run / hard["prefix"]).write_text(text + " extra", encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        inference_spul.main(["--model_checkpoints", str(run), "--output_path", str(tmp_path / "ev2"),
                             "--data_dir", str(folder), "--max_length", "64"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "prefix.txt" in err and "\n" not in err
    assert not (tmp_path / "ev2").exists()
