"""The forgetting audit's maths (utils.mia) on hand-made scores, and a run's audit.json against
the figures recomputed from its per-example records."""
import json
import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from utils import mia
from utils.runs import read_records


def test_auc_counts_member_over_nonmember_pairs():
    # pairs (member, non-member): 3>1, 3>2.5, 2>1, 2<2.5 -> 3 of 4
    assert mia.auc([3, 2], [1, 2.5]) == pytest.approx(0.75)
    assert mia.auc([1], [1]) == pytest.approx(0.5)  # a tie counts half


def test_auc_far_below_half_when_members_score_lower():
    """An over-forgotten forget set: every member scores below every non-member."""
    assert mia.auc([0, 1], [2, 3]) == 0.0


def test_auc_needs_both_groups():
    with pytest.raises(ValueError, match="member"):
        mia.auc([], [1.0])


def test_loss_score_is_the_true_label_logprob():
    lp = np.log([[0.2, 0.5], [0.7, 0.1]])
    assert mia.membership_scores(lp, [1, 0], "loss") == pytest.approx([math.log(0.5), math.log(0.7)])


def test_logit_score_on_hand_built_logprobs():
    two = np.log([[0.2, 0.5]])
    assert mia.logit_score(two, [1]) == pytest.approx([math.log(0.5 / 0.2)])
    three = np.log([[0.1, 0.3, 0.2]])
    assert mia.logit_score(three, [0]) == pytest.approx([math.log(0.1 / 0.5)])
    # stable where exp would underflow: log p(y) - log p(other) for two labels
    tiny = np.array([[-2000.0, -1000.0]])
    assert mia.logit_score(tiny, [0]) == pytest.approx([-1000.0])


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="unknown MIA score"):
        mia.membership_scores(np.zeros((1, 2)), [0], "zlib")


def test_privleak_relative_to_the_oracle():
    assert mia.privleak(0.6, 0.5) == pytest.approx(20.0)
    assert mia.privleak(0.4, 0.5) == pytest.approx(-20.0)
    assert mia.privleak(0.5, 0.5) == 0.0


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=20), rng.uniform(0.2, 1.0, size=30)
    assert mia.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert mia.forget_quality([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    # fully separated samples of 5: exact p = 2 / C(10, 5)
    assert mia.forget_quality([0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 0.95]) == pytest.approx(2 / 252)


def test_mia_metrics_per_side_and_missing_sides():
    lp = lambda ps: np.log(np.array([[1 - p, p] for p in ps]))
    per_split = {
        "train_forget": {"logprobs": lp([0.9, 0.8]), "labels": np.array([1, 1])},
        "test_forget": {"logprobs": lp([0.6, 0.85]), "labels": np.array([1, 1])},
        "train_retain": {"logprobs": lp([0.5]), "labels": np.array([1])},  # no test_retain: side left out
    }
    out = mia.mia_metrics(per_split)
    assert set(out) == {"forget"}
    # loss: members 0.9, 0.8 against 0.6, 0.85 -> 3 of 4 pairs
    assert out["forget"]["loss_auc"] == pytest.approx(0.75)
    assert out["forget"]["logit_auc"] == pytest.approx(0.75)  # monotone in p(y) for two labels


def test_a_runs_audit_equals_the_figures_recomputed_from_its_records(tmp_path, tiny_model_dir, tiny_data_args):
    import qlora

    out = tmp_path / "qlora"
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--no_quantize", "--output_path", str(out)] + tiny_data_args)
    records = read_records(out)
    metrics = json.loads((out / "metrics.json").read_text())
    audit = json.loads((out / "audit.json").read_text())
    assert audit["examples"] == len(records) == sum(m["n"] for m in metrics.values())
    per_split = {}
    for split in metrics:
        rows = [r for r in records if r["split"] == split]
        assert [r["row"] for r in rows] == list(range(metrics[split]["n"]))
        per_split[split] = {"logprobs": np.array([r["label_logprobs"] for r in rows]), "labels": np.array([r["label"] for r in rows])}
        # the records hold the predictions the metrics were computed from
        argmax_right = [r["label_logprobs"].index(max(r["label_logprobs"])) == r["label"] for r in rows]
        assert 100 * np.mean(argmax_right) == pytest.approx(metrics[split]["accuracy_restricted"])
    assert mia.mia_metrics(per_split) == audit["mia"]
    assert set(audit["mia"]) == {"forget", "retain"}
    assert all(0 <= v <= 1 for side in audit["mia"].values() for v in side.values())


def test_retrain_oracle_trains_on_train_retain_only_and_unlearning_it_warns(tmp_path, tiny_model_dir, tiny_data_args, monkeypatch, capsys):
    import qlora
    import spul

    seen = []
    real = qlora.train
    monkeypatch.setattr(qlora, "train", lambda model, params, loss, feats, *a, **k: seen.append(feats) or real(model, params, loss, feats, *a, **k))
    out = tmp_path / "retrain"
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--no_quantize", "--retain_only", "--output_path", str(out)] + tiny_data_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(seen[0]) == metrics["train_retain"]["n"] and not any(f["is_forget"] for f in seen[0])
    assert json.loads((out / "manifest.json").read_text())["retain_only"] is True
    assert "train_forget" in metrics and "forget" in json.loads((out / "audit.json").read_text())["mia"]  # still evaluated
    capsys.readouterr()
    spul.main(["--model_checkpoints", str(out), "--num_epochs", "1", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8",
               "--output_path", str(tmp_path / "spul")] + tiny_data_args)
    assert "a retrain oracle (trained without the forget set)" in capsys.readouterr().err
