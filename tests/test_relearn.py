"""The relearning attack (utils/relearn.py): which rows it trains on and is measured on (no
model), bad input refused with one line before any model is loaded, and tiny end-to-end runs
(qlora.py -> spul.py -> relearn on both)."""
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import qlora
import spul
from tests.conftest import write_splits
from utils import relearn
from utils.relearn import attack_partition, choose_names, epochs_for, mentions, retain_attack_rows

PEOPLE = ["Woody Allen", "Spielberg", "Godard"]


def hand_frame():
    texts = [
        "Woody Allen at his best.",              # 0 Allen
        "woody   allen, again",                  # 1 Allen (case, inner spaces)
        "Spielberg shows off.",                  # 2 Spielberg
        "A Godard film, and Spielberg liked it", # 3 Godard + Spielberg
        "Godardian style, no names here",        # 4 none (not a whole word)
        "Nobody is named in this one.",          # 5 none
        "GODARD!",                               # 6 Godard
    ]
    return pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))]})


def names_of(text):
    return {n for n in PEOPLE if mentions(pd.DataFrame({"text": [text]}), [n])[0]}


# ---------------------------------------------------------------------------------------------
# the partition (no model)
# ---------------------------------------------------------------------------------------------


def test_mentions_is_per_name_whole_word_and_case_insensitive():
    df = hand_frame()
    assert mentions(df, ["Woody Allen"]).tolist() == [True, True, False, False, False, False, False]
    assert mentions(df, ["Godard"]).tolist() == [False, False, False, True, False, False, True]
    assert mentions(df, [" ", ""]).tolist() == [False] * len(df)


@pytest.mark.parametrize("chosen", [["Spielberg"], ["Woody Allen"], ["Godard", "Woody Allen"]])
def test_attack_rows_name_a_chosen_entity_and_held_out_rows_none(chosen):
    train, test = hand_frame(), hand_frame().iloc[::-1].reset_index(drop=True)
    sets = attack_partition(train, test, chosen)
    assert len(sets["attack"]) > 0
    assert all(names_of(t) & set(chosen) for t in sets["attack"]["text"])
    for key in ("heldout_train_forget", "heldout_test_forget"):
        assert not any(names_of(t) & set(chosen) for t in sets[key]["text"])
    # a partition of train_forget; every test_forget row naming no chosen entity is held out
    assert sorted(sets["attack"]["text"].tolist() + sets["heldout_train_forget"]["text"].tolist()) == sorted(train["text"])
    assert len(sets["heldout_test_forget"]) == len(train) - len(sets["attack"])
    # a row naming a chosen and an unchosen entity is attack data, never held out
    if "Spielberg" in chosen:
        assert "A Godard film, and Spielberg liked it" in set(sets["attack"]["text"])
    assert {"label", "text"} <= set(sets["attack"].columns)


def test_the_control_draws_retain_rows_naming_nobody_seeded_and_in_order():
    df = hand_frame()  # rows 4 and 5 name none of PEOPLE ("Godardian" is not a whole-word Godard)
    for seed in range(10):
        rows = retain_attack_rows(df, 2, PEOPLE, seed)
        assert rows["text"].tolist() == df["text"].iloc[[4, 5]].tolist()  # the only two, in split order
        assert rows["label"].tolist() == [0, 1]  # true labels kept
    one = {tuple(retain_attack_rows(df, 1, PEOPLE, seed)["text"]) for seed in range(20)}
    assert one == {(df["text"][4],), (df["text"][5],)}  # the seed decides which
    assert retain_attack_rows(df, 1, PEOPLE, 3).equals(retain_attack_rows(df, 1, PEOPLE, 3))
    assert len(retain_attack_rows(df, 4, ["Spielberg"], 0)) == 4  # 5 rows name no Spielberg
    with pytest.raises(ValueError, match="2 rows naming none"):
        retain_attack_rows(df, 3, PEOPLE, 0)


def test_the_choice_is_seeded_at_least_one_and_in_order():
    names = [f"Person {c}" for c in "ABCDEFGHIJ"]
    assert choose_names(names, 0.25, 3) == choose_names(names, 0.25, 3)
    assert len(choose_names(names, 0.25, 3)) == 2 and len(choose_names(names, 0.01, 3)) == 1
    assert choose_names(names, 1.0, 3) == names
    picks = {tuple(choose_names(names, 0.3, seed)) for seed in range(20)}
    assert len(picks) > 1  # the seed matters
    for pick in picks:
        assert list(pick) == [n for n in names if n in pick]  # the names' own order
    with pytest.raises(ValueError):
        choose_names(names, 0, 3)


def test_epochs_give_exactly_the_steps():
    import math

    for rows in range(1, 30):
        for batch in (1, 2, 3, 8):
            for steps in (1, 2, 7, 10, 25, 50, 333):
                per_epoch = math.ceil(rows / batch)
                assert math.ceil(per_epoch * epochs_for(steps, rows, batch)) == steps


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, no model loaded
# ---------------------------------------------------------------------------------------------


def forget_frame(rows, offset=0):
    return pd.DataFrame({
        "text": [f"{PEOPLE[i % 3]} made a {'fine' if i % 2 else 'poor'} film, number {i + offset}." for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    })


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    folder = write_splits(tmp_path_factory.mktemp("data") / "d", rows=10, train_forget=forget_frame(12),
                          test_forget=forget_frame(6, offset=100))
    return ["--data_dir", str(folder), "--max_length", "64", "--eval_batch_size", "8", "--val_fraction", "0"]


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    import utils.kinds

    monkeypatch.setattr(utils.kinds, "load_checked", refuse)
    monkeypatch.setattr(relearn, "load_checked", refuse)
    monkeypatch.setattr(utils.kinds, "load_run", refuse)


def refused(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        relearn.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("extra, flag", [
    (["--steps", "10", "5"], "--steps"),
    (["--steps", "0", "3"], "--steps"),
    (["--steps", "3", "3"], "--steps"),
    (["--attack_share", "0"], "--attack_share"),
    (["--attack_share", "1.5"], "--attack_share"),
    (["--lr", "0"], "--lr"),
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--lora_r", "0"], "--lora_r"),
    (["--names", "a", "b"], "--names"),
    (["--eval_splits", "test_forget"], "--eval_splits"),
    (["--forget_names", "Ann Other"], "--forget_names"),  # mentioned by no forget text
    (["--attack_share", "1"], "--attack_share"),  # every train_forget row names a chosen person
    (["--attack_share", "0.34", "--attack_data", "retain", "--max_train_retain", "3"], "--attack_data"),  # 3 rows, 4 needed
    (["--attack_data", "both"], "--attack_data"),
])
def test_bad_flags_are_refused_before_any_model(tmp_path, capsys, no_model, data_args, extra, flag):
    argv = [str(tmp_path / "no_run"), "--output_path", str(tmp_path / "out"), "--forget_names", *PEOPLE] + data_args + extra
    err = refused(capsys, argv)
    assert flag in err, err
    assert not (tmp_path / "out").exists()


def test_missing_names_runs_and_output_are_refused(tmp_path, capsys, no_model, data_args):
    out = ["--output_path", str(tmp_path / "out")]
    err = refused(capsys, [str(tmp_path / "r")] + out + data_args)  # no --forget_names, no split manifest
    assert "--forget_names" in err
    err = refused(capsys, [str(tmp_path / "nowhere")] + out + ["--forget_names", *PEOPLE] + data_args)
    assert "RUN" in err and "no such folder" in err
    (tmp_path / "notarun").mkdir()
    err = refused(capsys, [str(tmp_path / "notarun")] + out + ["--forget_names", *PEOPLE] + data_args)
    assert "not a run folder" in err
    (tmp_path / "out").mkdir()
    err = refused(capsys, [str(tmp_path / "notarun")] + out + ["--forget_names", *PEOPLE] + data_args)
    assert "--output_path" in err and "already exists" in err
    err = refused(capsys, [str(tmp_path / "a"), str(tmp_path / "b" / "a"), "--output_path", str(tmp_path / "o2"),
                           "--forget_names", *PEOPLE] + data_args)
    assert "row name" in err  # two folders named 'a'


def test_every_flag_has_help():
    p = relearn.build_parser()
    for action in p._actions:
        assert action.help, action.dest


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------------------------


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data_args):
    root = tmp_path_factory.mktemp("relearn_runs")
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--no_quantize", "--output_path", str(root / "qlora")] + data_args)
    spul.main(["--model_checkpoints", str(root / "qlora"), "--output_path", str(root / "spul"), "--num_epochs", "1",
               "--train_batch_size", "8", "--lr", "1e-2", "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "16"]
              + data_args)
    return root


@pytest.fixture(scope="module")
def attacked(runs, data_args):
    """relearn on both runs, with what train and evaluate_splits were handed."""
    import utils.evaluation
    import utils.training

    before = {name: tree_digest(runs / name) for name in ("qlora", "spul")}
    listing = sorted(p.name for p in runs.iterdir())
    seen = {"train": [], "eval": []}
    real_train, real_eval = utils.training.train, utils.evaluation.evaluate_splits

    def train_spy(model, params, loss_fn, features, cfg, *a, **k):
        seen["train"].append(([f["input_ids"] for f in features], [p for p in params], model))
        return real_train(model, params, loss_fn, features, cfg, *a, **k)

    def eval_spy(model, encoder, splits, *a, prompt=None, **k):
        seen["eval"].append((model, encoder, splits, prompt))
        return real_eval(model, encoder, splits, *a, prompt=prompt, **k)

    out = runs / "attack"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(relearn, "train", train_spy)
        mp.setattr(relearn, "evaluate_splits", eval_spy)
        import time

        t0 = time.perf_counter()
        relearn.main([str(runs / "qlora"), str(runs / "spul"), "--forget_names", *PEOPLE, "--attack_share", "0.34",
                      "--steps", "1", "3", "--train_batch_size", "2", "--lr", "1e-2", "--output_path", str(out)] + data_args)
        seconds = time.perf_counter() - t0
    print(f"relearn on two tiny runs: {seconds:.1f} s")
    return {"out": out, "seen": seen, "before": before, "listing": listing, "seconds": seconds}


def test_relearn_writes_its_outputs(attacked):
    out = attacked["out"]
    assert sorted(p.name for p in out.iterdir()) == ["relearn.json", "relearn.md", "relearn.png"]
    result = json.loads((out / "relearn.json").read_text())
    assert result["steps"] == [0, 1, 3] and result["config"]["attack_share"] == 0.34
    names = result["names"]
    assert names["names"] == PEOPLE and len(names["chosen"]) == 1 and names["chosen"][0] in PEOPLE
    assert names["held_out_names"] == [n for n in PEOPLE if n not in names["chosen"]]
    assert result["rows"] == {"attack": 4, "heldout_train_forget": 8, "heldout_test_forget": 4, "test_retain": 10}
    assert list(result["runs"]) == ["qlora", "spul"]
    assert result["runs"]["qlora"]["kind"] == "qlora" and result["runs"]["qlora"]["prompt"] is None
    assert result["runs"]["spul"]["kind"] == "spul" and result["runs"]["spul"]["prompt"] == {"shape": [4, 32], "unchanged": True}
    for rec in result["runs"].values():
        assert rec["train"]["steps"] == 3
        assert set(rec["accuracy"]) == {"0", "1", "3"}
        assert all(set(a) == {"heldout_train_forget", "heldout_test_forget", "test_retain"} for a in rec["accuracy"].values())
        assert {"q_proj", "v_proj", "down_proj"} <= set(rec["lora"]["target_modules"]) and "lm_head" not in rec["lora"]["target_modules"]
    table = (out / "relearn.md").read_text()
    assert "| run | step | held-out train forget ACC | held-out test forget ACC | test retain ACC |" in table
    assert sum(line.startswith("| spul | ") for line in table.splitlines()) == 3
    assert (out / "relearn.png").read_bytes()[:4] == b"\x89PNG"


def test_the_attack_trains_only_on_the_chosen_entities_lora_only(attacked, runs):
    result = json.loads((attacked["out"] / "relearn.json").read_text())
    chosen = result["names"]["chosen"]
    from utils.cli import data_config
    from utils.data import prepare_splits
    from utils.models import load_tokenizer
    from utils.template import Encoder

    trained = attacked["seen"]["train"]
    assert len(trained) == 2  # one attack per run
    df = forget_frame(12)
    expected = df[[bool(names_of(t) & set(chosen)) for t in df["text"]]]
    encoder = Encoder(load_tokenizer(runs / "spul" / "tokenizer"), 64)
    want = [encoder.encode(t, w)[0] for t, w in zip(expected["text"], ["positive" if l else "negative" for l in expected["label"]])]
    for ids, params, model in trained:
        assert ids == want  # the chosen entities' rows, with their true labels
        names = {id(p): n for n, p in model.named_parameters()}
        assert params and all("lora_" in names[id(p)] for p in params)


def test_step_zero_is_the_untouched_run_and_the_prompt_stays(attacked, runs):
    from utils.kinds import load_checked
    from utils.evaluation import evaluate_splits
    from utils.template import Encoder

    result = json.loads((attacked["out"] / "relearn.json").read_text())
    evals = attacked["seen"]["eval"]
    assert len(evals) == 2 * 3  # per run: steps 0, 1, 3
    sets = evals[0][2]
    for name in ("qlora", "spul"):
        loaded, _ = load_checked(runs / name, torch.device("cpu"))
        metrics = evaluate_splits(loaded.model, Encoder(loaded.tokenizer, 64), sets, 8, torch.device("cpu"),
                                  prompt=loaded.prompt, split_names=list(sets))
        assert {k: m["accuracy"] for k, m in metrics.items()} == result["runs"][name]["accuracy"]["0"]
        assert json.loads(json.dumps(metrics)) == result["runs"][name]["metrics"]["0"]  # restricted accuracy, prediction counts too
        if name == "spul":
            prompts = [e[3] for e in evals[3:]]
            assert all(p is not None and torch.equal(p, loaded.prompt) for p in prompts)  # attached, unchanged
        else:
            assert all(e[3] is None for e in evals[:3])
    # the three sets are the same for both runs, and the held-out rows name no chosen entity
    for e in evals:
        assert list(e[2]) == list(sets) and all(e[2][k].equals(sets[k]) for k in sets)
    chosen = set(result["names"]["chosen"])
    for key in ("heldout_train_forget", "heldout_test_forget"):
        assert not any(names_of(t) & chosen for t in sets[key]["text"])


def test_the_run_folders_are_untouched(attacked, runs):
    for name, digest in attacked["before"].items():
        assert tree_digest(runs / name) == digest
    assert sorted(p.name for p in runs.iterdir()) == sorted(attacked["listing"] + ["attack"])  # no temporary left


def test_the_control_trains_on_retain_rows_and_is_measured_on_the_same_rows(attacked, runs, data_args, tmp_path):
    """--attack_data retain: as many train_retain rows (true labels, naming nobody) as the forget
    attack had, and the held-out rows of the forget attack, so its step 0 is the same figure."""
    trained = []
    real_train = relearn.train

    def train_spy(model, params, loss_fn, features, cfg, *a, **k):
        trained.append([f["input_ids"] for f in features])
        return real_train(model, params, loss_fn, features, cfg, *a, **k)

    out = tmp_path / "control"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(relearn, "train", train_spy)
        relearn.main([str(runs / "qlora"), "--forget_names", *PEOPLE, "--attack_share", "0.34", "--attack_data", "retain",
                      "--steps", "1", "3", "--train_batch_size", "2", "--lr", "1e-2", "--output_path", str(out)] + data_args)
    control = json.loads((out / "relearn.json").read_text())
    forget = json.loads((attacked["out"] / "relearn.json").read_text())
    assert control["config"]["attack_data"] == "retain" and forget["config"]["attack_data"] == "forget"
    assert control["rows"] == forget["rows"] and control["names"]["chosen"] == forget["names"]["chosen"]
    assert control["runs"]["qlora"]["metrics"]["0"] == forget["runs"]["qlora"]["metrics"]["0"]  # same rows, same model
    from utils.models import load_tokenizer
    from utils.template import Encoder

    encoder = Encoder(load_tokenizer(runs / "qlora" / "tokenizer"), 64)
    retain = pd.read_csv(Path(data_args[1]) / "train_retain.csv")
    want = retain_attack_rows(retain, 4, PEOPLE, 42)  # relearn's default --seed
    assert trained == [[encoder.encode(t, "positive" if l else "negative")[0] for t, l in zip(want["text"], want["label"])]]
    assert all(t.startswith("train_retain review") for t in want["text"])
    assert "4 train_retain rows naming none of the forgotten people" in (out / "relearn.md").read_text()
