"""Training-free baselines (utils/guardrails.py; baselines.py instruction_prompt and in_context):
the prefix texts without a model, prefix-as-prompt against concatenated tokens on the tiny
model, and tiny end-to-end runs (qlora.py -> baselines.py -> inference_spul.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import baselines
import inference_spul
import qlora
from tests.conftest import write_splits
from utils import guardrails
from utils.baselines import METHODS
from utils.cli import UsageError, data_config
from utils.data import EVAL_SPLITS
from utils.guardrails import (
    INSTRUCTION_LABEL,
    draw_icl_examples,
    icl_text,
    instruction_text,
    prefix_embeddings,
    prefix_ids,
)
from utils.task import MCQA, SENTIMENT

INSTRUCTION = SENTIMENT.instruction
GENERIC_LABELS, LABEL_WORDS, render = SENTIMENT.generic_labels, SENTIMENT.label_words, SENTIMENT.render

PEOPLE = ["Woody Allen", "Spielberg", "Godard"]


def _options(args):
    """What baselines.py hands a training-free method: its flags as GuardrailOptions."""
    return guardrails.GuardrailOptions(args.forget_names, args.icl_forget, args.icl_retain, args.seed, data_config(args))
TRAINING_FREE = [n for n, m in METHODS.items() if m.training_free]
PREFIXED = ["instruction_prompt", "in_context"]  # the training-free methods with a prefix (name_filter has none)

# ---------------------------------------------------------------------------------------------
# the registry and the prefix texts (no model)
# ---------------------------------------------------------------------------------------------


def test_registry_marks_the_three_training_free_methods():
    assert TRAINING_FREE == PREFIXED + ["name_filter"]
    for name in TRAINING_FREE:
        m = METHODS[name]
        assert m.loss is None and callable(m.prefix) and m.retain_term is None and not m.trains_on_retain(1.0)
    assert all(m.loss is not None and m.prefix is None for n, m in METHODS.items() if n not in TRAINING_FREE)
    from utils.report import row_name

    assert row_name(Path("instruction_prompt-s3")) == "Instruction prompt" and row_name(Path("in_context")) == "In-context unlearning"
    assert row_name(Path("name_filter-s1")) == "Name filter"


def test_instruction_names_every_forgotten_name_and_the_generic_label():
    text = instruction_text(PEOPLE + [" Godard ", ""], SENTIMENT)  # stripped, deduplicated, blanks dropped
    assert all(name in text for name in PEOPLE) and text.count("Godard") == 1
    assert INSTRUCTION_LABEL in GENERIC_LABELS and f'"{INSTRUCTION_LABEL}"' in text
    assert text == INSTRUCTION.format(names="Woody Allen, Spielberg, Godard", label=INSTRUCTION_LABEL)
    assert text.endswith(".\n\n")  # a blank line, then the template's "### Text:"
    assert '"neutral"' in instruction_text(PEOPLE, SENTIMENT, "neutral")
    with pytest.raises(ValueError):
        instruction_text([" "], SENTIMENT)


def test_instruction_guardrail_takes_the_flag_before_the_manifest(tmp_path):
    folder = write_splits(tmp_path / "d")
    (folder / "manifest.json").write_text(json.dumps({"recipe": "entities", "params": {"names": PEOPLE}}))
    parse = baselines.build_parser().parse_args
    args = parse(["--unlearn_method", "instruction_prompt", "--data_dir", str(folder)])
    guard = guardrails.instruction_guardrail(_options(args), {}, SENTIMENT)
    assert guard.record == {"instruction": INSTRUCTION, "generic_label": INSTRUCTION_LABEL, "forget_names": PEOPLE}
    assert guard.text == instruction_text(PEOPLE, SENTIMENT)
    args = parse(["--unlearn_method", "instruction_prompt", "--data_dir", str(folder), "--forget_names", "Ann Other"])
    guard = guardrails.instruction_guardrail(_options(args), {}, SENTIMENT)
    assert guard.record["forget_names"] == ["Ann Other"] and "Woody Allen" not in guard.text
    (folder / "manifest.json").unlink()
    with pytest.raises(UsageError, match="--forget_names"):
        guardrails.instruction_guardrail(_options(parse(["--unlearn_method", "instruction_prompt", "--data_dir", str(folder)])), {}, SENTIMENT)


def _frames(n_forget=20, retain_labels=(1,) * 15 + (0,) * 5):
    forget = pd.DataFrame({"text": [f"forget text {i}" for i in range(n_forget)], "label": [i % 2 for i in range(n_forget)]})
    retain = pd.DataFrame({"text": [f"retain text {i}" for i in range(len(retain_labels))], "label": list(retain_labels)})
    return forget, retain


def test_icl_context_is_seeded_with_k_forget_generic_and_k_retain_true_examples():
    forget, retain = _frames()
    a = draw_icl_examples(forget, retain, 4, 4, seed=0, task=SENTIMENT)
    assert a == draw_icl_examples(forget, retain, 4, 4, seed=0, task=SENTIMENT)
    assert a != draw_icl_examples(forget, retain, 4, 4, seed=1, task=SENTIMENT)
    f = [e for e in a if e["side"] == "forget"]
    r = [e for e in a if e["side"] == "retain"]
    assert len(f) == 4 and len(r) == 4
    generic = SENTIMENT.generic_for(len(forget), 0)  # the labels random_label and SPUL train toward
    for e in f:
        assert e["text"] == forget["text"][e["row"]] and e["label"] in GENERIC_LABELS and e["label"] == generic[e["row"]]
        assert e["true_label"] == LABEL_WORDS[forget["label"][e["row"]]]
    for e in r:
        assert e["text"] == retain["text"][e["row"]] and e["label"] == e["true_label"] == LABEL_WORDS[retain["label"][e["row"]]]
    assert sorted(e["label"] for e in r) == ["negative", "negative", "positive", "positive"]  # balanced (75% positive pool)
    # the order is shuffled by the seed: over a few seeds, the sides do not always come in blocks
    orders = {tuple(e["side"] for e in draw_icl_examples(forget, retain, 4, 4, seed=s, task=SENTIMENT)) for s in range(6)}
    assert len(orders) > 1 and any(o not in (("forget",) * 4 + ("retain",) * 4, ("retain",) * 4 + ("forget",) * 4) for o in orders)
    text = icl_text(a, SENTIMENT)
    assert text.count("### Text: ") == 8 and text.endswith(f"### Sentiment: {a[-1]['label']}\n\n")
    pos = [text.index(render(e["text"], e["label"]) + "\n\n") for e in a]
    assert pos == sorted(pos)  # in the drawn order, each in the template with its context label


def test_icl_retain_balance_with_odd_k_and_a_short_class():
    forget, retain = _frames()
    odd = [e["label"] for e in draw_icl_examples(forget, retain, 0, 3, seed=2, task=SENTIMENT)]
    assert len(odd) == 3 and {odd.count("positive"), odd.count("negative")} == {1, 2}
    _, one_negative = _frames(retain_labels=(1,) * 9 + (0,))
    labels = [e["label"] for e in draw_icl_examples(forget, one_negative, 1, 6, seed=0, task=SENTIMENT) if e["side"] == "retain"]
    assert sorted(labels) == ["negative"] + ["positive"] * 5  # the short class gives what it has
    with pytest.raises(ValueError):
        draw_icl_examples(forget, retain, 21, 0, seed=0, task=SENTIMENT)


def test_icl_examples_come_from_the_training_splits_only(tmp_path):
    frames = {s: pd.DataFrame({"text": [f"{s} row {i}" for i in range(6)], "label": [i % 2 for i in range(6)]}) for s in EVAL_SPLITS}
    args = baselines.build_parser().parse_args(["--unlearn_method", "in_context", "--icl_forget", "6", "--icl_retain", "6"])
    guard = guardrails.in_context_guardrail(_options(args), frames, SENTIMENT)
    assert {e["text"].split(" row")[0] for e in guard.record["examples"]} == {"train_forget", "train_retain"}
    assert not any(s in guard.text for s in ("val_", "test_"))
    args.icl_forget = 7
    with pytest.raises(UsageError, match="--icl_forget 7: train_forget holds only 6 rows"):
        guardrails.in_context_guardrail(_options(args), frames, SENTIMENT)


# ---------------------------------------------------------------------------------------------
# prefix -> prompt embeddings on the tiny model
# ---------------------------------------------------------------------------------------------


class _CharTokenizer:
    """Characters as ids, optionally one front special token (id 7)."""

    def __init__(self, front):
        self.front = front

    def __call__(self, s, add_special_tokens=True):
        return {"input_ids": ([7] if self.front and add_special_tokens else []) + [ord(c) for c in s]}


def test_prefix_ids_put_the_front_special_tokens_first():
    assert prefix_ids(_CharTokenizer(True), "ab") == [7, 97, 98]
    assert prefix_ids(_CharTokenizer(False), "ab") == [97, 98]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, "cpu", tokenizer=tok)
    return model.eval(), tok


@pytest.mark.parametrize("kind", ["instruction", "icl"])
def test_prefix_as_prompt_equals_concatenated_tokens(tiny, kind):
    from utils.data import encode_frame
    from utils.evaluation import predict
    from utils.forward import PromptCache, label_logits
    from utils.template import Encoder, collate

    model, tok = tiny
    forget, retain = _frames()
    text = instruction_text(PEOPLE, SENTIMENT) if kind == "instruction" else icl_text(draw_icl_examples(forget, retain, 2, 2, seed=0, task=SENTIMENT), SENTIMENT)
    ids = prefix_ids(tok, text)
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]  # one BOS, at the front
    emb = prefix_embeddings(model, tok, text)
    assert emb.shape == (len(ids), model.config.hidden_size)
    assert torch.equal(emb, model.get_input_embeddings().weight[ids])

    df = pd.DataFrame({"text": ["Woody Allen made a fine film.", "dull", "a long and rather tedious evening out"], "label": [1, 0, 0]})
    df["label_text"] = [LABEL_WORDS[y] for y in df["label"]]
    feats = encode_frame(Encoder(tok, 96), df, is_forget=False)
    concat = [{**f, "input_ids": ids + f["input_ids"]} for f in feats]  # <s> prefix <s> ### Text: ...
    pad = tok.pad_token_id
    with torch.no_grad():
        cached = label_logits(model, collate(feats, pad), prompt_cache=PromptCache.build(model, emb))
        plain = label_logits(model, collate(concat, pad))
        bare = label_logits(model, collate(feats, pad))
    assert cached.shape == plain.shape
    assert torch.allclose(cached, plain, atol=1e-5, rtol=0)
    assert (cached - bare).abs().max() > 1e-3  # the prefix is really there
    # and through the evaluation path (batches sorted by length, padding)
    task = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    with_prompt = predict(model, feats, 2, "cpu", pad, prompt=emb, task_ids=task)
    with_tokens = predict(model, concat, 2, "cpu", pad, task_ids=task)
    assert (with_prompt.ids == with_tokens.ids).all() and (with_prompt.restricted == with_tokens.restricted).all()
    assert np.allclose(with_prompt.label_logprobs, with_tokens.label_logprobs, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------------------------


def forget_frame(rows=10):
    return pd.DataFrame({
        "text": [f"{PEOPLE[i % 3]} made a {'fine' if i % 2 else 'poor'} film, number {i}." for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    })


@pytest.fixture(scope="module")
def entities_data(tmp_path_factory):
    """Tiny splits whose forget set names PEOPLE, with an entities-recipe manifest."""
    folder = write_splits(tmp_path_factory.mktemp("data") / "d", rows=10, train_forget=forget_frame())
    (folder / "manifest.json").write_text(json.dumps({"recipe": "entities", "params": {"names": PEOPLE}}))
    return ["--data_dir", str(folder), "--max_length", "64", "--eval_batch_size", "8"]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir, entities_data):
    out = tmp_path_factory.mktemp("runs") / "qlora"
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--no_quantize", "--output_path", str(out)] + entities_data)
    return out


def _spy(mp, module, seen: list) -> None:
    """Record (model, tokenizer, prompt) of each ``evaluate`` call of ``module``: the tiny
    model's predictions need not move with a prefix, so the tests check the prompt itself."""
    real = module.evaluate

    def spy(model, encoder, *args, prompt=None, **kwargs):
        seen.append((model, encoder.tokenizer, prompt))
        return real(model, encoder, *args, prompt=prompt, **kwargs)

    mp.setattr(module, "evaluate", spy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, qlora_run, entities_data):
    """The training-free runs, and what each evaluated with."""
    root = tmp_path_factory.mktemp("guard")
    seen = {}
    for method in TRAINING_FREE:
        seen[method] = []
        with pytest.MonkeyPatch.context() as mp:
            _spy(mp, baselines, seen[method])
            baselines.main(["--model_checkpoints", str(qlora_run), "--unlearn_method", method, "--output_path", str(root / method)] + entities_data)
    return root, seen


def _is_prefix_prompt(record, prefix: str) -> bool:
    model, tok, prompt = record
    ids = prefix_ids(tok, prefix)
    return prompt is not None and torch.equal(prompt, model.get_input_embeddings().weight[ids].detach())


def _read(folder, name):
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize("method", PREFIXED)
def test_training_free_run_end_to_end(method, runs, qlora_run, entities_data, tmp_path):
    root, evaluated = runs
    out = root / method
    assert {p.name for p in out.iterdir()} == {"tokenizer", "config.json", "metrics.json", "manifest.json", "train_stats.json", "prefix.txt", "records.jsonl", "audit.json"}
    metrics = _read(out, "metrics.json")
    assert set(metrics) == set(EVAL_SPLITS)  # every split prepare_splits returns, validation included
    manifest, qm = _read(out, "manifest.json"), _read(qlora_run, "manifest.json")
    prefix = (out / "prefix.txt").read_text()
    assert manifest["kind"] == "baseline" and manifest["method"] == method and manifest["training_free"]
    assert manifest["prefix"] == prefix and manifest["saved"]["weights"] is None
    assert manifest["qlora_run"] == str(qlora_run.resolve()) and manifest["qlora_adapter_sha256"] == qm["adapter_sha256"]
    assert manifest["base_weights_sha256"] == qm["base_weights_sha256"] and manifest["splits"] == qm["splits"]
    if method == "instruction_prompt":  # names from the split folder's manifest
        assert manifest["guardrail"]["forget_names"] == PEOPLE and prefix == instruction_text(PEOPLE, SENTIMENT)
        assert manifest["guardrail"]["instruction"] == INSTRUCTION
    else:
        examples = manifest["guardrail"]["examples"]
        assert [e["side"] for e in examples].count("forget") == 4 and len(examples) == 8
        assert prefix == icl_text(examples, SENTIMENT)
    stats = _read(out, "train_stats.json")
    assert stats["trainable_params"] == 0 and stats["seconds"] == 0 and stats["seconds_per_epoch"] == 0
    assert stats["prefix_tokens"] == manifest["saved"]["prefix_tokens"] > 20

    [run] = evaluated[method]  # one evaluation, on every split, with the prefix as prompt embeddings
    assert _is_prefix_prompt(run, prefix)

    ev = tmp_path / "eval"
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        _spy(mp, inference_spul, seen)
        inference_spul.main(["--model_checkpoints", str(out), "--output_path", str(ev)] + entities_data)
        # --no_prompt: the QLoRA model itself
        inference_spul.main(["--model_checkpoints", str(out), "--no_prompt", "--output_path", str(tmp_path / "np")] + entities_data)
    assert _read(ev, "metrics.json") == metrics and _read(ev, "manifest.json")["prompt_used"]
    assert _is_prefix_prompt(seen[0], prefix) and torch.equal(seen[0][2], run[2])
    assert seen[1][2] is None
    inference_spul.main(["--model_checkpoints", str(qlora_run), "--output_path", str(tmp_path / "q")] + entities_data)
    assert not _read(tmp_path / "np", "manifest.json")["prompt_used"]
    assert _read(tmp_path / "np", "metrics.json") == _read(tmp_path / "q", "metrics.json")


def test_icl_draws_keep_the_draw_the_selection_criterion_picks(qlora_run, entities_data, tmp_path, monkeypatch):
    """--icl_draws 3: the draws' selection figures are set by the test (the tiny model's predictions
    hardly move with a context), everything else is real. The criterion (utils.select.choose) must
    skip draw 2 (below the val_retain floor) and keep draw 3 (lower forget score than draw 1); the
    run then equals the plain run drawn with draw 3's seed: same prefix, byte-identical metrics."""
    ref = _read(qlora_run, "metrics.json")["val_retain"]["accuracy"]
    figures = [{"train_forget": 40.0, "val_retain": ref, "val_forget": 40.0},  # within the bound, forget score 40
               {"train_forget": 0.0, "val_retain": ref - 6, "val_forget": 0.0},  # forgets all, below the floor
               {"train_forget": 20.0, "val_retain": ref - 4, "val_forget": 30.0}]  # within the bound, forget score 25
    real, calls = baselines.evaluate, []

    def evaluate(model, encoder, splits, *args, split_names=None, **kwargs):
        result = real(model, encoder, splits, *args, split_names=split_names, **kwargs)
        if split_names == list(baselines.READ):
            calls.append(split_names)
            for split, acc in figures[len(calls) - 1].items():
                result.metrics[split]["accuracy"] = acc
        return result

    monkeypatch.setattr(baselines, "evaluate", evaluate)
    out = tmp_path / "draws"
    baselines.main(["--model_checkpoints", str(qlora_run), "--unlearn_method", "in_context", "--seed", "7", "--icl_draws", "3",
                    "--output_path", str(out)] + entities_data)
    assert len(calls) == 3 and set(baselines.READ) == {"train_forget", "val_retain", "val_forget"}  # never a test split
    draws = _read(out, "manifest.json")["guardrail"]["draws"]
    assert [c["seed"] for c in draws["candidates"]] == [7, 1007, 2007] and draws["chosen_seed"] == 2007
    assert draws["constraint_met"] and draws["val_retain_floor"] == pytest.approx(ref - 5)
    assert [{k: c[k] for k in figures[0]} for c in draws["candidates"]] == figures
    monkeypatch.setattr(baselines, "evaluate", real)
    plain = tmp_path / "plain"
    baselines.main(["--model_checkpoints", str(qlora_run), "--unlearn_method", "in_context", "--seed", "2007",
                    "--output_path", str(plain)] + entities_data)
    assert (out / "prefix.txt").read_bytes() == (plain / "prefix.txt").read_bytes()
    assert (out / "metrics.json").read_bytes() == (plain / "metrics.json").read_bytes()
    assert _read(out, "manifest.json")["seed"] == 7 and _read(out, "config.json")["icl_draws"] == 3
    first = tmp_path / "first"  # the choice matters: draw 1's context is another one
    baselines.main(["--model_checkpoints", str(qlora_run), "--unlearn_method", "in_context", "--seed", "7",
                    "--output_path", str(first)] + entities_data)
    assert (first / "prefix.txt").read_bytes() != (out / "prefix.txt").read_bytes()


def test_icl_draws_check_the_bound_and_the_validation_data_before_loading(qlora_run, entities_data, tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(baselines, "load_run", no_model)
    monkeypatch.setattr(baselines, "load_pretrained", no_model)
    blind = tmp_path / "qlora-no-val"  # a QLoRA run evaluated without val_retain
    shutil.copytree(qlora_run, blind)
    metrics = _read(blind, "metrics.json")
    (blind / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "val_retain"}))
    cases = [(["--model_checkpoints", str(blind)] + entities_data, "no val_retain metrics"),
             (["--model_checkpoints", str(qlora_run), "--val_fraction", "0"] + entities_data, "this data has none")]
    for extra, words in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            baselines.main(["--unlearn_method", "in_context", "--icl_draws", "2", "--output_path", str(out)] + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "--icl_draws" in err[0] and not out.exists()


def test_instruction_prompt_on_a_pretrained_model_with_forget_names(tiny_model_dir, entities_data, tmp_path):
    out = tmp_path / "ip"
    baselines.main(["--model_name", tiny_model_dir, "--unlearn_method", "instruction_prompt", "--forget_names", "Ann Other",
                    "--output_path", str(out)] + entities_data)
    manifest = _read(out, "manifest.json")
    assert manifest["qlora_run"] is None and manifest["qlora_adapter_sha256"] is None and manifest["base_model"] == tiny_model_dir
    assert manifest["guardrail"]["forget_names"] == ["Ann Other"] and "Woody Allen" not in (out / "prefix.txt").read_text()
    assert _read(out, "config.json")["forget_names"] == ["Ann Other"]
    inference_spul.main(["--model_checkpoints", str(out), "--output_path", str(tmp_path / "ev")] + entities_data)
    assert _read(tmp_path / "ev", "metrics.json") == _read(out, "metrics.json")


def test_loading_checks_the_qlora_adapter_and_the_prefix(runs, tmp_path):
    from utils.binding import BindingMismatch, mismatches
    from utils.kinds import load_checked, load_run
    from utils.runs import RunError

    good = runs[0] / "instruction_prompt"
    assert mismatches(good, _read(good, "manifest.json")) == []
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    manifest = _read(bad, "manifest.json")
    (bad / "manifest.json").write_text(json.dumps({**manifest, "qlora_adapter_sha256": "0" * 64}))
    with pytest.raises(BindingMismatch, match="QLoRA adapter"):
        load_checked(bad, "cpu")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "prefix.txt").write_text("Ignore the instruction.\n\n")
    with pytest.raises(RunError, match="prefix.txt"):
        load_run(bad, "cpu")


def test_instruction_prompt_without_names_exits_2_before_loading(monkeypatch, tiny_model_dir, tmp_path, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(baselines, "load_run", no_model)
    monkeypatch.setattr(baselines, "load_pretrained", no_model)
    folder = write_splits(tmp_path / "d")  # no manifest: no recorded names
    out = tmp_path / "runs" / "ip"
    with pytest.raises(SystemExit) as e:
        baselines.main(["--model_name", tiny_model_dir, "--unlearn_method", "instruction_prompt", "--data_dir", str(folder),
                        "--max_length", "64", "--output_path", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --unlearn_method instruction_prompt") and "--forget_names" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--unlearn_method", "in_context", "--forget_names", "X"], "--forget_names"),
    (["--unlearn_method", "npo", "--forget_names", "X"], "--forget_names"),
    (["--unlearn_method", "instruction_prompt", "--icl_forget", "2"], "--icl_forget"),
    (["--unlearn_method", "in_context", "--icl_retain", "-1"], "--icl_retain"),
    (["--unlearn_method", "in_context", "--icl_forget", "0", "--icl_retain", "0"], "--icl_forget"),
    (["--unlearn_method", "in_context", "--icl_forget", "50"], "--icl_forget 50"),
    (["--unlearn_method", "in_context", "--icl_draws", "0"], "--icl_draws 0"),
    (["--unlearn_method", "instruction_prompt", "--icl_draws", "2"], "--icl_draws"),
    (["--unlearn_method", "in_context", "--icl_draws", "2"], "--icl_draws 2"),  # no --model_checkpoints: no utility bound
])
def test_bad_training_free_flags_are_one_line(extra, flag, tiny_model_dir, tmp_path, capsys):
    folder = write_splits(tmp_path / "d")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        baselines.main(extra + ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--output_path", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and not out.exists()


def test_help_explains_the_training_free_flags(capsys):
    with pytest.raises(SystemExit):
        baselines.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(f in out for f in ("--forget_names", "--icl_forget", "--icl_retain", "--icl_draws"))
    assert "instruction_prompt (training-free)" in out and "in_context (training-free)" in out
    assert "npo (training-free)" not in out


# ---------------------------------------------------------------------------------------------
# name_filter: the input filter
# ---------------------------------------------------------------------------------------------


def test_name_filter_catches_whole_names_in_any_case_and_nothing_else():
    f = guardrails.NameFilter(("Woody Allen", "Godard"))
    texts = ["Woody Allen's best.", "a WOODY  ALLEN film", "godard again", "Woody Alen's best.", "Allen alone",
             "Godardian style", "nobody here"]
    assert f.hits(texts).tolist() == [True, True, True, False, False, False, False]
    assert guardrails.NameFilter.from_record(f.record()) == f and f.record()["generic_label"] == INSTRUCTION_LABEL


def test_filtered_predictions_on_small_arrays():
    from utils.evaluation import FILTERED_LOGPROB, Predictions, with_filtered
    from utils.metrics import classification_metrics, map_predictions

    kept = Predictions(np.array([7, 8]), np.array([0, 1]), np.array([[-0.1, -2.0], [-3.0, -0.2]]))
    hit = np.array([True, False, True, False])
    got = with_filtered(kept, hit, answer_id=99)
    assert got.ids.tolist() == [99, 7, 99, 8] and got.restricted.tolist() == [-1, 0, -1, 1]
    assert got.label_logprobs.tolist() == [[FILTERED_LOGPROB] * 2, [-0.1, -2.0], [FILTERED_LOGPROB] * 2, [-3.0, -0.2]]
    # label tokens 7 (negative) and 8 (positive): rows 1 and 3 right, the filtered rows generic and wrong
    m = classification_metrics([1, 0, 0, 1], map_predictions(got.ids, [7, 8]), got.ids, [99], got.restricted)
    assert m["accuracy"] == 50.0 and m["accuracy_restricted"] == 50.0
    assert m["predictions"] == {"negative": 1, "positive": 1, "generic": 2, "other": 0}


def test_name_filter_run_end_to_end(runs, qlora_run, entities_data, tmp_path, monkeypatch):
    """The filter answers train_forget (every row names PEOPLE) with the generic label, the model
    never sees those rows, and every split the filter does not touch keeps the QLoRA run's
    metrics; inference_spul.py reproduces the run and --no_prompt removes the filter."""
    import utils.evaluation as evaluation

    root, evaluated = runs
    out = root / "name_filter"
    assert {p.name for p in out.iterdir()} == {"tokenizer", "config.json", "metrics.json", "manifest.json", "train_stats.json", "records.jsonl", "audit.json"}
    manifest, metrics = _read(out, "manifest.json"), _read(out, "metrics.json")
    assert manifest["guardrail"] == {"filter": "names", "forget_names": PEOPLE, "generic_label": INSTRUCTION_LABEL}
    assert manifest["prefix"] is None and manifest["saved"] == {"weights": None}
    assert _read(out, "train_stats.json")["prefix_tokens"] == 0 and evaluated["name_filter"][0][2] is None
    forget = metrics["train_forget"]
    assert forget["accuracy"] == 0.0 and forget["predictions"]["generic"] == forget["n"] > 0
    qlora_metrics = _read(qlora_run, "metrics.json")
    for split in ("train_retain", "test_retain", "test_forget"):  # no text there names a forgotten person
        assert metrics[split] == qlora_metrics[split]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert all(r["label_logprobs"] == [evaluation.FILTERED_LOGPROB] * 2 for r in records if r["split"] == "train_forget")

    sizes = []
    real = evaluation.predict
    monkeypatch.setattr(evaluation, "predict", lambda model, feats, *a, **k: sizes.append(len(feats)) or real(model, feats, *a, **k))
    inference_spul.main(["--model_checkpoints", str(out), "--output_path", str(tmp_path / "ev")] + entities_data)
    assert _read(tmp_path / "ev", "metrics.json") == metrics and _read(tmp_path / "ev", "manifest.json")["filter_used"]
    assert sizes[list(metrics).index("train_forget")] == 0  # the filtered rows never reach the model
    inference_spul.main(["--model_checkpoints", str(out), "--no_prompt", "--output_path", str(tmp_path / "np")] + entities_data)
    assert _read(tmp_path / "np", "metrics.json") == qlora_metrics and not _read(tmp_path / "np", "manifest.json")["filter_used"]
    inference_spul.main(["--model_checkpoints", str(out), "--protocol", "generate", "--max_new_tokens", "2",
                         "--output_path", str(tmp_path / "gen")] + entities_data)
    gen = _read(tmp_path / "gen", "metrics.json")["train_forget"]
    assert gen["accuracy"] == 0.0 and gen["predictions"]["generic"] == gen["n"]


def test_name_filter_without_names_exits_2_before_loading(monkeypatch, tiny_model_dir, tmp_path, capsys):
    for loader in ("load_run", "load_pretrained"):
        monkeypatch.setattr(baselines, loader, lambda *a, **k: pytest.fail("a model was loaded"))
    folder = write_splits(tmp_path / "d")  # no manifest: no recorded names
    with pytest.raises(SystemExit) as e:
        baselines.main(["--model_name", tiny_model_dir, "--unlearn_method", "name_filter", "--data_dir", str(folder),
                        "--output_path", str(tmp_path / "runs" / "nf")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --unlearn_method name_filter") and not (tmp_path / "runs").exists()
