"""utils/readout.py: the linear read-out probes on synthetic features, and the tool end to end
on the tiny model (train and validation splits only, one-line refusals)."""
import json

import numpy as np
import pandas as pd
import pytest

import qlora
from tests.conftest import write_splits
from utils import readout
from utils.readout import CONTRASTS, probe_auc

PEOPLE = ["Woody Allen", "Spielberg", "Godard"]


def test_probe_auc_separable_chance_and_sign():
    rng = np.random.default_rng(0)
    n, d = 200, 8
    y = np.r_[np.ones(n), np.zeros(n)]
    x = rng.normal(size=(2 * n, d))
    x_sep = x.copy()
    x_sep[:n, 3] += 4.0  # the positives differ along one feature
    xv = rng.normal(size=(2 * n, d))
    xv_sep = xv.copy()
    xv_sep[:n, 3] += 4.0
    assert probe_auc(x_sep, y, xv_sep, y) > 0.97
    assert probe_auc(x_sep, y, xv_sep, 1 - y) < 0.03  # the AUC reads the positive class's score
    assert abs(probe_auc(x, y, xv, y) - 0.5) < 0.1  # nothing to find: chance


def test_readout_scores_each_contrast_and_layer_on_validation():
    rng = np.random.default_rng(1)
    n, layers, d = 60, 3, 6

    def sets(shift_label, shift_pooled):
        out = {}
        for name in ("retain", "forget", "swapped"):
            lab, pool = rng.normal(size=(n, layers, d)), rng.normal(size=(n, layers, d))
            if name == "forget":
                lab[:, 1, 0] += shift_label  # forget readable at the label position at layer 1 only
                pool[:, 2, 0] += shift_pooled  # and anywhere in the sequence at layer 2 only
            if name in ("forget", "swapped"):
                lab[:, 0, 1] += 5.0  # "names someone" at layer 0: both differ from retain alike
            out[name] = (lab, pool)
        return out

    result = readout.readout({"train": sets(5.0, 5.0), "val": sets(5.0, 5.0)})
    assert set(result) == set(CONTRASTS)
    fs = result["forget_vs_swapped"]
    assert len(fs["label"]) == layers and len(fs["pooled"]) == layers
    assert fs["label"][1] > 0.95 and abs(fs["label"][0] - 0.5) < 0.2
    assert fs["pooled"][2] > 0.95 and abs(fs["pooled"][1] - 0.5) < 0.2
    assert result["swapped_vs_retain"]["label"][0] > 0.95 and result["forget_vs_retain"]["label"][0] > 0.95
    assert "pooled" not in result["forget_vs_retain"]


def forget_frame(rows=16):
    return pd.DataFrame({
        "text": [f"{PEOPLE[i % 3]} made a {'fine' if i % 2 else 'poor'} film, number {i}." for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    })


@pytest.fixture(scope="module")
def entity_run(tmp_path_factory, tiny_model_dir):
    folder = write_splits(tmp_path_factory.mktemp("data") / "d", rows=16, train_forget=forget_frame())
    (folder / "manifest.json").write_text(json.dumps({"recipe": "entities", "params": {"names": PEOPLE}}))
    data = ["--data_dir", str(folder), "--max_length", "64", "--max_val_retain", "4", "--max_val_forget", "4"]
    out = tmp_path_factory.mktemp("runs") / "qlora"
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--no_quantize", "--eval_batch_size", "8", "--output_path", str(out)] + data)
    return out, data


def test_end_to_end_on_the_tiny_model(entity_run, tmp_path, capsys):
    run, data = entity_run
    readout.main([str(run), *data, "--output_path", str(tmp_path / "r")])
    saved = json.loads((tmp_path / "r" / "readout.json").read_text())
    assert saved["sizes"]["val"] == {"retain": 4, "forget": 4, "swapped": 4}
    assert saved["sizes"]["train"]["forget"] == saved["sizes"]["train"]["swapped"] == 12
    layers = 3  # the tiny Llama's 2 layers + the embeddings
    for name in CONTRASTS:
        assert len(saved["auc"][name]["label"]) == layers
        assert all(0.0 <= a <= 1.0 for a in saved["auc"][name]["label"])
    # at the embeddings (layer 0) the label-predicting position is the same token in every text
    assert saved["auc"]["forget_vs_swapped"]["label"][0] == 0.5
    assert "| layer |" in capsys.readouterr().out


@pytest.mark.parametrize("extra, flag", [(["--eval_splits", "train_retain", "test_forget"], "--eval_splits"),
                                         (["--probe_c", "0"], "--probe_c")])
def test_refusals_are_one_line_and_write_nothing(entity_run, tmp_path, capsys, extra, flag):
    run, data = entity_run
    with pytest.raises(SystemExit) as e:
        readout.main([str(run), *data, *extra, "--output_path", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {flag}") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_with_prefix_puts_the_ids_in_front_and_moves_the_label_position():
    from utils.template import collate

    feats = [{"input_ids": [5, 6, 7], "label_ids": [7], "label": 1}, {"input_ids": [8, 9], "label_ids": [9], "label": 0}]
    out = readout.with_prefix(feats, [1, 2])
    assert [f["input_ids"] for f in out] == [[1, 2, 5, 6, 7], [1, 2, 8, 9]]
    assert feats[0]["input_ids"] == [5, 6, 7]  # the input is not modified
    assert collate(out, 0)["label_pos"][:, 0].tolist() == [3, 2]  # the token before each label, 2 later


def test_instruction_prefix_end_to_end(entity_run, tiny_model_dir, tmp_path):
    from utils.guardrails import instruction_text, prefix_ids
    from utils.models import load_tokenizer
    from utils.task import SENTIMENT

    run, data = entity_run
    readout.main([str(run), *data, "--prefix", "instruction", "--output_path", str(tmp_path / "r")])
    saved = json.loads((tmp_path / "r" / "readout.json").read_text())
    expected = prefix_ids(load_tokenizer(tiny_model_dir, set_pad_id=True), instruction_text(PEOPLE, SENTIMENT))
    assert saved["prefix"] == "instruction" and saved["prefix_tokens"] == len(expected) > 20
    # layer 0 still reads one and the same token at the label position
    assert saved["auc"]["forget_vs_swapped"]["label"][0] == 0.5
