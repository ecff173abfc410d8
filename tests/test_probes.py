"""Robustness probes (utils/probes.py): the text transforms on hand-written strings, each probe
changing only what it says, the paraphrase encoder, flags refused before any model is loaded,
and end to end on the tiny model with a QLoRA and a SPUL run made here."""
import json
import time

import pandas as pd
import pytest

import qlora
import spul
from tests.conftest import write_splits
from utils import probes
from tests.tiny import tiny_tokenizer
from utils.probes import (
    DEFAULT_QUESTION,
    NAME_PROBES,
    PARAPHRASES,
    PROBES,
    name_case,
    name_surname,
    name_typo,
    probe_splits,
    question_encoder,
    question_suffix,
    typo_word,
)
from utils.splits import name_pattern
from utils.template import Encoder
from utils.task import SENTIMENT

LABEL_WORDS = SENTIMENT.label_words
PREFIX = SENTIMENT.prefix
SUFFIX = SENTIMENT.suffix

PEOPLE = ["Woody Allen", "Spielberg", "Godard"]
SPUL_ARGS = ["--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-2",
             "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "16"]


# ---------------------------------------------------------------------------------------------
# the transforms on hand-written strings
# ---------------------------------------------------------------------------------------------


def test_case_probe():
    assert name_case("I loved the Woody Allen film", ["Woody Allen"]) == "I loved the woody allen film"
    assert name_case("woody allen again", ["Woody Allen"]) == "WOODY ALLEN again"  # already lower: upper
    assert name_case("Godard, then GODARD.", PEOPLE) == "godard, then godard."
    assert name_case("Godardian cinema", PEOPLE) == "Godardian cinema"  # whole words only


def test_typo_probe():
    assert name_typo("I loved the Woody Allen film", ["Woody Allen"]) == "I loved the Woody Aleln film"
    assert name_typo("by Godard and Spielberg", PEOPLE) == "by Gdoard and Sipelberg"
    assert typo_word("Woody") == "Wodoy" and typo_word("Allen") == "Aleln"
    assert typo_word("Aaaa") == "Aaa"  # inner letters all the same: the second one dropped
    assert typo_word("Lee") == "Lee" and typo_word("Ray") == "Ray"  # fewer than 4 letters: left alone
    assert name_typo("a film by Ang Lee", ["Ang Lee"]) == "a film by Ang Lee"  # no word of 4 letters
    assert name_typo("a film by Ang Leeds", ["Ang Leeds"]) == "a film by Ang Ledes"


def test_surname_probe():
    assert name_surname("I loved the Woody Allen film", ["Woody Allen"]) == "I loved the Allen film"
    assert name_surname("woody  ALLEN's best", ["Woody Allen"]) == "ALLEN's best"  # as written in the text
    assert name_surname("a Godard film", PEOPLE) == "a Godard film"  # one-word names unchanged


def test_registry():
    assert list(PROBES) == ["none", *PARAPHRASES, "name_case", "name_typo", "name_surname", "no_prompt"]
    assert NAME_PROBES == ("name_case", "name_typo", "name_surname")
    kinds = {n: p.kind for n, p in PROBES.items()}
    assert kinds["none"] == "reference" and kinds["no_prompt"] == "prompt"
    assert all(kinds[n] == "question" for n in PARAPHRASES) and all(kinds[n] == "names" for n in NAME_PROBES)
    assert all(p.description for p in PROBES.values())
    assert len(set(PARAPHRASES.values())) == 3 and DEFAULT_QUESTION not in PARAPHRASES.values()


# ---------------------------------------------------------------------------------------------
# each probe changes exactly what it says
# ---------------------------------------------------------------------------------------------

FRAME = pd.DataFrame({
    "text": ["Woody Allen made a fine film.", "A dull evening, says godard.", "Nobody named here; Allenby is a town.",
             "Spielberg and WOODY ALLEN, twice: Woody Allen.", "plain text", ""],
    "label": [1, 0, 0, 1, 1, 0],
})


@pytest.mark.parametrize("name", NAME_PROBES)
def test_name_probes_change_only_the_name_matches(name):
    pattern = name_pattern(PEOPLE)
    [probed], [changed] = (d.values() for d in probe_splits(PROBES[name], {"train_forget": FRAME}, PEOPLE))
    assert list(probed["label"]) == list(FRAME["label"]) and len(probed) == len(FRAME)
    for before, after in zip(FRAME["text"], probed["text"]):
        matches = list(pattern.finditer(before))
        if not matches:
            assert after == before  # byte-identical
            continue
        # the text between the matches is untouched; each match replaced by the transform of it
        expected, end = "", 0
        for m in matches:
            expected += before[end:m.start()] + PROBES[name].transform(m.group(0), PEOPLE)
            end = m.end()
        assert after == expected + before[end:]
    one_word_only = sum(bool(pattern.search(t)) and not any(len(m.group(0).split()) > 1 for m in pattern.finditer(t)) for t in FRAME["text"])
    named = sum(bool(pattern.search(t)) for t in FRAME["text"])
    assert changed == (named - one_word_only if name == "name_surname" else named)


def test_other_probes_change_no_text_and_a_retain_split_is_checked_not_assumed():
    for name in ("none", "question_feel", "no_prompt"):
        probed, changed = probe_splits(PROBES[name], {"x": FRAME}, PEOPLE)
        assert probed["x"] is FRAME and changed == {"x": 0}
    retain = pd.DataFrame({"text": ["a retain text", "but this one names Godard"], "label": [0, 1]})
    _, changed = probe_splits(PROBES["name_case"], {"train_retain": retain}, PEOPLE)
    assert changed == {"train_retain": 1}  # would be evaluated, not reused


# ---------------------------------------------------------------------------------------------
# the paraphrase encoder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.pad_token = t.eos_token
    return t


def ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_default_encoder_is_unchanged(tok):
    assert question_suffix(DEFAULT_QUESTION) == SUFFIX
    text = "a rather fine film by Woody Allen"
    before = [tok.bos_token_id] + ids(tok, PREFIX) + ids(tok, text) + ids(tok, SUFFIX) + ids(tok, " positive")
    for enc in (Encoder(tok, 96), Encoder(tok, 96, suffix=SUFFIX), question_encoder(tok, 96)):
        assert enc.encode(text, "positive") == (before, ids(tok, " positive"))
        assert enc.overhead == Encoder(tok, 96).overhead and enc.max_length == 96


@pytest.mark.parametrize("name", list(PARAPHRASES))
@pytest.mark.parametrize("max_length", [400, 40])  # 40: the text is truncated
def test_paraphrase_differs_only_in_the_question_tokens(tok, name, max_length):
    text = " ".join(["a long and rather tedious evening"] * 6)
    default = Encoder(tok, max_length)
    para = question_encoder(tok, max_length, PARAPHRASES[name])
    for word in LABEL_WORDS:
        a, lab_a = default.encode(text, word)
        b, lab_b = para.encode(text, word)
        assert lab_a == lab_b
        head = len(a) - len(default._suffix) - len(lab_a)  # bos, prefix, the text's tokens
        assert b[:head] == a[:head] and b[-len(lab_b):] == lab_a  # same text tokens, same label
        middle = b[head:len(b) - len(lab_b)]
        q = ids(tok, "\n\n### Question: ")
        assert middle == q + ids(tok, PARAPHRASES[name]) + ids(tok, "\n\n### Sentiment:")
        assert a[head:len(a) - len(lab_a)] == q + ids(tok, DEFAULT_QUESTION) + ids(tok, "\n\n### Sentiment:")
    if max_length == 40:
        assert len(a) == 40 and len(b) == 40 + len(para._suffix) - len(default._suffix)


# ---------------------------------------------------------------------------------------------
# the command line: bad input refused in one line before any model is loaded
# ---------------------------------------------------------------------------------------------


def test_every_flag_has_help():
    p = probes.build_parser()
    assert all(a.help for a in p._actions)
    assert "probes.json" in p.description and all(n in p.description for n in PROBES)


def forget_frame(rows, names, start=0):
    return pd.DataFrame({
        "text": [f"{names[i % len(names)]} made a {'fine' if i % 2 else 'poor'} film, number {start + i}." for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    })


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny splits: the forget splits name PEOPLE (test_forget one-word names only), the retain
    splits nobody; no split manifest, so the names come from --forget_names."""
    folder = write_splits(tmp_path_factory.mktemp("data") / "d", rows=8, train_forget=forget_frame(10, PEOPLE),
                          test_forget=forget_frame(6, ["Spielberg", "Godard"], start=10))
    return ["--data_dir", str(folder), "--max_length", "64", "--eval_batch_size", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):
    root = tmp_path_factory.mktemp("runs")
    # trained enough that it answers with label words (the probe table is not all zeros)
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "4", "--train_batch_size", "8", "--lr", "3e-2",
                "--no_quantize", "--output_path", str(root / "qlora")] + data)
    spul.main(["--model_checkpoints", str(root / "qlora"), "--output_path", str(root / "spul")] + SPUL_ARGS + data)
    return root


@pytest.fixture
def no_model(monkeypatch):
    import utils.kinds

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(utils.kinds, "load_checked", refuse)
    monkeypatch.setattr(probes, "load_checked", refuse)
    monkeypatch.setattr(utils.kinds, "load_run", refuse)


@pytest.mark.parametrize("extra, expect", [
    (["--probes", "bogus"], "--probes"),
    (["--names", "only-one"], "--names"),
    (["--probes", "none", "question_feel", "--forget_names", "X"], "--forget_names"),
    (["--eval_batch_size", "0"], "--eval_batch_size"),
    (["--max_length", "10", "--forget_names", "X"], "--max_length 10"),
    ([], "--forget_names"),  # name probes asked for (the default), no names anywhere
    (["--forget_names", "X", "--data_dir", "/nonexistent/data"], "--data_dir"),
])
def test_bad_flags_exit_2_before_any_model_is_loaded(extra, expect, runs, data, no_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(runs / "qlora"), str(runs / "spul")] + data + extra + ["--output_path", str(out)]
    with pytest.raises(SystemExit) as e:
        probes.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists()


def test_bad_runs_and_outputs_exit_2(runs, data, no_model, tmp_path, capsys):
    def refused(argv):
        with pytest.raises(SystemExit) as e:
            probes.main(argv + data + ["--forget_names", *PEOPLE])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        return err[0]

    (tmp_path / "not_a_run").mkdir()
    assert "no manifest.json" in refused([str(tmp_path / "not_a_run"), "--output_path", str(tmp_path / "o")])
    assert "no such folder" in refused([str(tmp_path / "missing"), "--output_path", str(tmp_path / "o")])
    (tmp_path / "exists").mkdir()
    assert "--overwrite" in refused([str(runs / "qlora"), "--output_path", str(tmp_path / "exists")])
    assert "would replace the run folder" in refused([str(runs / "qlora"), "--output_path", str(runs / "qlora"), "--overwrite"])
    assert not (tmp_path / "o").exists() and (runs / "qlora" / "manifest.json").is_file()


def test_markdown_marks_reuse_no_change_and_not_applicable():
    report = {
        "splits": ["train_forget"], "split_rows": {"train_forget": 3}, "forget_names": ["Godard"], "names_source": "--forget_names",
        "probes": [{"name": n, "description": PROBES[n].description} for n in ("none", "name_surname", "no_prompt")],
        "changed_texts": {"name_surname": {"train_forget": 0}},
        "runs": [{"name": "R", "results": {
            "none": {"applicable": True, "metrics": {"train_forget": {"accuracy": 50.0}}, "reused_from_none": []},
            "name_surname": {"applicable": True, "metrics": {"train_forget": {"accuracy": 50.0}}, "reused_from_none": ["train_forget"]},
            "no_prompt": {"applicable": False, "metrics": None, "reused_from_none": []}}}],
    }
    md = probes.format_markdown(report)
    assert "| R | none | 50.00 |" in md and "| R | name_surname (no text changed) | 50.00† |" in md
    assert "| R | no_prompt | n/a |" in md and "| name_surname | 0/3 |" in md


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------------------------


def _json(x):
    return json.loads(json.dumps(x))


def test_end_to_end(runs, data, tmp_path, monkeypatch):
    import utils.evaluation
    from utils.kinds import load_checked
    from utils.cli import data_config
    from utils.data import prepare_splits

    import torch

    # the tiny model's accuracies barely move under any probe, so the checks below also compare
    # the label-position logits of each evaluate_splits call
    real, real_logits = utils.evaluation.evaluate_splits, utils.evaluation.label_logits
    calls, logits = [], []

    def spy(model, encoder, splits, *a, prompt=None, split_names=None, **k):
        calls.append((tuple(split_names), prompt is None, encoder._suffix))
        logits.append([])
        return real(model, encoder, splits, *a, prompt=prompt, split_names=split_names, **k)

    def spy_logits(*a, **k):
        out = real_logits(*a, **k)
        logits[-1].append(out[:, 0].detach().clone())
        return out

    monkeypatch.setattr(probes, "evaluate_splits", spy)
    monkeypatch.setattr(utils.evaluation, "label_logits", spy_logits)
    out = tmp_path / "probes"
    argv = [str(runs / "qlora"), str(runs / "spul")] + data + ["--forget_names", *PEOPLE, "--names", "QLoRA", "SPUL",
                                                              "--output_path", str(out)]
    start = time.perf_counter()
    probes.main(argv)
    print(f"probes e2e wall time: {time.perf_counter() - start:.1f}s")

    assert sorted(p.name for p in out.iterdir()) == ["probes.json", "probes.md"]
    report = json.loads((out / "probes.json").read_text())
    four = ["train_retain", "train_forget", "test_retain", "test_forget"]
    assert report["splits"] == four and report["forget_names"] == PEOPLE and report["names_source"] == "--forget_names"
    assert [p["name"] for p in report["probes"]] == list(PROBES) and all(p["description"] for p in report["probes"])
    assert report["questions"] == {"default": DEFAULT_QUESTION, **PARAPHRASES}
    rows = report["split_rows"]
    assert rows["train_forget"] == 9 and rows["test_forget"] == 6  # one train_forget row carved into val_forget
    changed = report["changed_texts"]
    for name in NAME_PROBES:
        assert changed[name]["train_retain"] == changed[name]["test_retain"] == 0
    assert changed["name_case"]["train_forget"] == changed["name_typo"]["train_forget"] == 9
    assert changed["name_case"]["test_forget"] == 6
    assert 0 < changed["name_surname"]["train_forget"] < 9 and changed["name_surname"]["test_forget"] == 0

    qrun, srun = report["runs"]
    assert (qrun["name"], qrun["kind"], qrun["has_prompt"]) == ("QLoRA", "qlora", False)
    assert (srun["name"], srun["kind"], srun["has_prompt"]) == ("SPUL", "spul", True)
    for run in (qrun, srun):
        res = run["results"]
        assert list(res) == list(PROBES)
        for name in NAME_PROBES:  # unchanged splits reuse the reference metrics
            reused = [s for s in four if changed[name][s] == 0]
            assert res[name]["reused_from_none"] == reused
            assert all(res[name]["metrics"][s] == res["none"]["metrics"][s] for s in reused)
        assert all(set(res[n]["metrics"]) == set(four) for n in PROBES if res[n]["applicable"])
    assert qrun["results"]["no_prompt"] == {"applicable": False, "metrics": None, "reused_from_none": []}

    # which evaluations ran: unchanged splits were not evaluated again
    default = Encoder(tiny_tokenizer(), 64)._suffix
    per_run = {"QLoRA": calls[:7], "SPUL": calls[7:]}
    assert len(calls) == 7 + 8
    cat = [torch.cat(x) for x in logits]
    q_none, s_none, s_no_prompt = cat[0], cat[7], cat[14]
    assert torch.equal(s_no_prompt, q_none)  # without its prompt the SPUL run is its QLoRA model
    assert not torch.allclose(s_none, s_no_prompt)  # and with it, the prompt is really there
    for i in (1, 2, 3, 8, 9, 10):  # every paraphrase changes the logits
        assert not torch.allclose(cat[i], cat[0 if i < 7 else 7])
    # name_case keeps every token count, so its forget rows line up with the reference's: the
    # probed texts were fed in
    r = [rows[s] for s in four]
    forget_rows = torch.cat([q_none[r[0]:r[0] + r[1]], q_none[sum(r[:3]):]])
    assert cat[4].shape == forget_rows.shape and not torch.allclose(cat[4], forget_rows)
    for label, run_calls in per_run.items():
        no_prompt = label == "QLoRA"  # the QLoRA run has no prompt; SPUL's is used until no_prompt
        assert run_calls[0] == (tuple(four), no_prompt, default)  # none
        assert [c[2] != default for c in run_calls[1:4]] == [True] * 3 and all(c[0] == tuple(four) for c in run_calls[1:4])
        assert [c[0] for c in run_calls[4:7]] == [("train_forget", "test_forget"), ("train_forget", "test_forget"), ("train_forget",)]
    assert per_run["SPUL"][7] == (tuple(four), True, default) and not any(c[1] for c in per_run["SPUL"][:7])

    # 'none' is evaluate_splits on the same run and data; no_prompt on SPUL is its QLoRA model
    args = probes.build_parser().parse_args(argv)
    args.eval_splits = four
    splits = prepare_splits(data_config(args))
    for run, row in (("qlora", qrun), ("spul", srun)):
        loaded, _ = load_checked(runs / run, "cpu")
        logits.append([])  # this direct call's label logits (the spy on probes.evaluate_splits does not see it)
        direct = utils.evaluation.evaluate_splits(loaded.model, Encoder(loaded.tokenizer, 64), splits, 8, "cpu",
                                                  prompt=loaded.prompt, split_names=four)
        assert row["results"]["none"]["metrics"] == _json(direct)
        assert torch.equal(torch.cat(logits[-1]), q_none if run == "qlora" else s_none)
        stored = json.loads((runs / run / "metrics.json").read_text())
        assert all(stored[s] == row["results"]["none"]["metrics"][s] for s in four)
    assert srun["results"]["no_prompt"]["metrics"] == qrun["results"]["none"]["metrics"]

    md = (out / "probes.md").read_text()
    assert md.count("| QLoRA |") == len(PROBES) and md.count("| SPUL |") == len(PROBES)
    assert "| QLoRA | no_prompt | n/a | n/a | n/a | n/a |" in md
    acc = f"{srun['results']['none']['metrics']['train_retain']['accuracy']:.2f}"
    assert f"| SPUL | name_case | {acc}† |" in md
    assert "Woody Allen, Spielberg, Godard" in md


def test_name_filter_catches_the_names_in_any_case_and_misses_typos(runs, data, tmp_path):
    """A name filter run: under name_case it still answers every forget text with the generic
    label; under name_typo it catches none, so its metrics there are its QLoRA model's."""
    import baselines

    filt = tmp_path / "filter"
    baselines.main(["--model_checkpoints", str(runs / "qlora"), "--unlearn_method", "name_filter", "--forget_names", *PEOPLE,
                    "--output_path", str(filt)] + data)
    out = tmp_path / "probes"
    probes.main([str(runs / "qlora"), str(filt)] + data + ["--forget_names", *PEOPLE, "--probes", "name_case", "name_typo",
                                                          "no_prompt", "--output_path", str(out)])
    qrun, frun = json.loads((out / "probes.json").read_text())["runs"]
    q, f = qrun["results"], frun["results"]
    for probe in ("none", "name_case"):
        forget = f[probe]["metrics"]["train_forget"]
        assert forget["accuracy"] == 0.0 and forget["predictions"]["generic"] == forget["n"] == 9
    assert f["name_typo"]["metrics"]["train_forget"] == q["name_typo"]["metrics"]["train_forget"]
    assert f["none"]["metrics"]["train_retain"] == q["none"]["metrics"]["train_retain"]
    assert f["no_prompt"]["applicable"] is False
