"""The generation protocol (``utils.generation``, ``inference_spul.py --protocol generate``):
parsing of generated text, batched greedy decoding with the key/value cache (padded rows and a
soft prompt from ``PromptCache`` give what one row decoded alone, or with the prompt prepended
and no cache, gives), agreement of its first token with the argmax protocol, sharding over
processes, and the CLI end to end."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import inference_spul
from tests.conftest import write_splits
from utils import distributed
from utils.data import EVAL_SPLITS, encode_frame
from utils.evaluation import label_token_ids, predict
from utils.forward import PromptCache
from utils.generation import MAX_NEW_TOKENS, generate, generate_predictions, generation_metrics, greedy_decode, prompt_features
from utils.metrics import OTHER
from utils.models import load_model, load_tokenizer
from tests.tiny import save_tiny_model, tiny_llama
from utils.task import SENTIMENT, substring_answer as parse_generation
from utils.template import Encoder

GENERIC_LABELS, LABEL_WORDS, answer_index = SENTIMENT.generic_labels, SENTIMENT.label_words, SENTIMENT.answer_index

V, D, P = 48, 32, 5
SHARP = 0.2  # initializer_range: at the default 0.02 attention is nearly uniform, so wrong
# position ids or a dropped prompt would hardly change a greedy token
ROWS = [[1, 5, 6, 7, 8], [1, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17], [1, 5, 16, 17], [1, 20, 21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(V, seed=0, initializer_range=SHARP).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randn(P, D, generator=torch.Generator().manual_seed(1))


def cache_for(model, prompt):
    with torch.inference_mode():
        return PromptCache.build(model, prompt) if prompt is not None else None


def reference_decode(model, row, prompt, steps):
    """Greedy decoding of one row by plain forwards over the growing sequence (no cache), the
    prompt embeddings prepended."""
    ids, out = list(row), []
    with torch.no_grad():
        for _ in range(steps):
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            if prompt is not None:
                embeds = torch.cat([prompt.unsqueeze(0), embeds], dim=1)
            token = int(model(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def test_parse_generation_first_occurrence_wins():
    assert parse_generation(" positive, not negative", LABEL_WORDS) == 1
    assert parse_generation(" negative. It is positive", LABEL_WORDS) == 0
    assert parse_generation("The sentiment is: NEGATIVE", LABEL_WORDS) == 0
    assert parse_generation(" Positive\n\n###", LABEL_WORDS) == 1
    assert parse_generation(" neutral", LABEL_WORDS) == OTHER
    assert parse_generation("", LABEL_WORDS) == OTHER
    assert parse_generation(" pos itive", LABEL_WORDS) == OTHER
    assert parse_generation(" unknown, or neutral", GENERIC_LABELS) == 1
    assert parse_generation(" Neutral", GENERIC_LABELS) == 0


def test_answer_index_prefers_a_task_label_over_a_generic_one():
    assert answer_index(" neutral, maybe positive") == 1  # a task label anywhere wins
    assert answer_index(" Unknown") == len(LABEL_WORDS) + 1
    assert answer_index(" neutral") == len(LABEL_WORDS)
    assert answer_index(" good") == OTHER


def test_generation_metrics_counts_each_generation_once():
    texts = [" positive", " Negative!", " neutral", " blah", " unknown positive", " negative or positive"]
    y_true = [1, 1, 0, 0, 1, 0]
    m = generation_metrics(SENTIMENT, y_true, texts, restricted=np.array([1, 0, 0, 1, 1, 1]))
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)  # rows 0, 4, 5
    assert m["predictions"] == {"negative": 2, "positive": 2, "generic": 1, "other": 1}
    assert m["accuracy_restricted"] == pytest.approx(100 * 3 / 6)  # rows 0, 2, 4
    assert m["examples"] == texts[:5]


# ---------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_prompt", [False, True])
def test_batched_decoding_equals_one_row_at_a_time(model, prompt, with_prompt):
    cache = cache_for(model, prompt if with_prompt else None)
    assert len({len(r) for r in ROWS}) == len(ROWS)  # different lengths: padding in the batch
    batched, first = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS, cache)
    alone = [greedy_decode(model, [r], 0, "cpu", MAX_NEW_TOKENS, cache)[0][0] for r in ROWS]
    reordered, _ = greedy_decode(model, ROWS[::-1], 0, "cpu", MAX_NEW_TOKENS, cache)
    assert batched == alone
    assert reordered == alone[::-1]
    assert all(len(r) == MAX_NEW_TOKENS for r in batched)
    assert len({tuple(r) for r in batched}) > 1  # the rows really decode differently
    assert first.shape == (len(ROWS), V) and first.dtype == torch.float32
    assert first.argmax(-1).tolist() == [r[0] for r in batched]


@pytest.mark.parametrize("with_prompt", [False, True])
def test_cached_decoding_equals_plain_forwards_over_the_growing_sequence(model, prompt, with_prompt):
    p = prompt if with_prompt else None
    got, _ = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS, cache_for(model, p))
    want = [reference_decode(model, r, p, MAX_NEW_TOKENS) for r in ROWS]
    assert got == want


def test_the_prompt_changes_what_is_generated(model, prompt):
    plain, _ = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS)
    prompted, _ = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS, cache_for(model, prompt))
    assert plain != prompted


def test_stop_tokens_cut_rows_without_changing_the_others(model):
    full, _ = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS)
    stop = full[1][2]  # row 1 stops before its third token
    cut, _ = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS, stop_ids=[stop])
    for row, c in zip(full, cut):
        want = row[: row.index(stop)] if stop in row else row
        assert c == want
    assert len(cut[1]) <= 2 and any(c == r for c, r in zip(cut, full))  # some rows cut, some not
    # every row stops at once: decoding ends early with the same (empty) answers
    firsts = {r[0] for r in full}
    early, _ = greedy_decode(model, ROWS, 0, "cpu", MAX_NEW_TOKENS, stop_ids=sorted(firsts))
    assert early == [[] for _ in ROWS]


# ---------------------------------------------------------------------------------------------
# Against the argmax protocol, on a tiny model with a real tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """A tiny random Llama with the offline tokenizer, saved like a real model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("sharp_model"), initializer_range=SHARP)


@pytest.fixture(scope="module")
def tiny(sharp_model_dir):
    model, _ = load_model(sharp_model_dir, "cpu")
    tokenizer = load_tokenizer(sharp_model_dir)
    return model.eval(), Encoder(tokenizer, 96)


@pytest.fixture(scope="module")
def frame():
    texts = ["a fine film", "dull", "what is the sentiment of this long and winding review, really?", "bad bad bad",
             "quite good fun", "x", "an overlong mess with no point", "great", "meh", "it was ok I guess"]
    return pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))],
                         "label_text": [LABEL_WORDS[i % 2] for i in range(len(texts))]})


def test_prompt_features_end_with_the_sentiment_marker(tiny, frame):
    _, encoder = tiny
    full = encode_frame(encoder, frame, False)
    feats = prompt_features(encoder, frame)
    suffix = encoder.tokenizer("### Sentiment:", add_special_tokens=False)["input_ids"]
    for f, g in zip(feats, full):
        assert f["input_ids"] + g["label_ids"] == g["input_ids"]
        assert f["input_ids"][-len(suffix):] == suffix


@pytest.mark.parametrize("with_prompt", [False, True])
def test_first_generated_token_is_the_argmax_prediction(tiny, frame, with_prompt):
    model, encoder = tiny
    p = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(2)) if with_prompt else None
    task_ids = label_token_ids(encoder, LABEL_WORDS)
    pad = encoder.tokenizer.pad_token_id
    preds = predict(model, encode_frame(encoder, frame, False), 4, "cpu", pad, p, task_ids)
    pred_ids, restricted = preds.ids, preds.restricted
    rows = [f["input_ids"] for f in prompt_features(encoder, frame)]
    new, _ = greedy_decode(model, rows, pad, "cpu", 1, cache_for(model, p))
    assert [r[0] for r in new] == pred_ids.tolist()
    _, gen_restricted = generate(model, encoder.tokenizer, prompt_features(encoder, frame), 4, "cpu", p, 1, task_ids)
    assert np.array_equal(gen_restricted, restricted)


def test_generate_predictions_decodes_and_parses(tiny, frame):
    model, encoder = tiny
    texts, pred = generate_predictions(model, encoder, frame, 4, "cpu", max_new_tokens=3)
    rows = [f["input_ids"] for f in prompt_features(encoder, frame)]
    new, _ = greedy_decode(model, rows, encoder.tokenizer.pad_token_id, "cpu", 3,
                           stop_ids=[encoder.tokenizer.eos_token_id])
    assert texts == [encoder.tokenizer.decode(r, skip_special_tokens=True) for r in new]
    assert len(texts) == len(frame) and any(texts)
    assert pred.tolist() == [parse_generation(t, LABEL_WORDS) for t in texts]


class Sent(Exception):
    """Raised by the fake ``gather_objects`` to hand back what one rank would send."""


def test_generation_under_two_processes_gathers_the_single_process_result(tiny, frame, monkeypatch):
    model, encoder = tiny
    feats = prompt_features(encoder, frame)
    task_ids = label_token_ids(encoder, LABEL_WORDS)
    single = generate(model, encoder.tokenizer, feats, 3, "cpu", None, 3, task_ids)

    def as_rank(r, gather):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "is_main", lambda: r == 0)
        monkeypatch.setattr(distributed, "shard", lambda items: items[r::2])
        monkeypatch.setattr(distributed, "gather_objects", gather)
        return generate(model, encoder.tokenizer, feats, 3, "cpu", None, 3, task_ids)

    def send(obj):
        raise Sent(obj)

    parts = []
    for r in (0, 1):
        with pytest.raises(Sent) as sent:
            as_rank(r, send)
        parts.append(sent.value.args[0])
    done = [set(indices) for indices, _ in parts]
    assert done[0] and done[1] and not done[0] & done[1] and done[0] | done[1] == set(range(len(feats)))
    texts, restricted = as_rank(0, lambda obj: parts)
    assert texts == single[0]
    assert np.array_equal(restricted, single[1])


# ---------------------------------------------------------------------------------------------
# inference_spul.py --protocol generate
# ---------------------------------------------------------------------------------------------


def test_cli_generate_writes_metrics_for_every_split(sharp_model_dir, tmp_path, capsys):
    data = write_splits(tmp_path / "data")
    common = ["--model_name", sharp_model_dir, "--data_dir", str(data), "--max_length", "96", "--eval_batch_size", "4"]
    out = tmp_path / "gen"
    inference_spul.main(common + ["--protocol", "generate", "--max_new_tokens", "3", "--output_path", str(out)])
    printed = capsys.readouterr().out
    assert "| Vanilla (generate) |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(EVAL_SPLITS)  # val splits carved by the default --val_fraction
    for name, m in metrics.items():
        assert m["n"] >= 1 and 0 <= m["accuracy"] <= 100
        assert sum(m["predictions"].values()) == m["n"]
        assert len(m["examples"]) == min(5, m["n"]) and all(isinstance(t, str) for t in m["examples"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"] == "generate" and manifest["max_new_tokens"] == 3
    assert manifest["evaluated"]["kind"] == "vanilla"

    # the metrics are what generate_predictions gives in process
    model, _ = load_model(sharp_model_dir, "cpu")
    encoder = Encoder(load_tokenizer(sharp_model_dir), 96)
    test = pd.read_csv(data / "test_retain.csv")
    test["label_text"] = [LABEL_WORDS[i] for i in test["label"]]
    texts, pred = generate_predictions(model.eval(), encoder, test, 4, "cpu", max_new_tokens=3)
    assert metrics["test_retain"]["examples"] == texts[:5]
    assert metrics["test_retain"]["accuracy"] == pytest.approx(100 * np.mean(pred == test["label"].to_numpy()))

    argmax = tmp_path / "argmax"
    inference_spul.main(common + ["--output_path", str(argmax)])
    assert "| Vanilla |" in capsys.readouterr().out
    manifest = json.loads((argmax / "manifest.json").read_text())
    assert manifest["protocol"] == "argmax" and manifest["max_new_tokens"] is None
    assert "examples" not in json.loads((argmax / "metrics.json").read_text())["test_retain"]


def test_cli_generate_evaluates_a_spul_run_with_its_prompt(sharp_model_dir, tmp_path):
    import spul
    from utils.kinds import load_checked

    data = write_splits(tmp_path / "data")
    common = ["--data_dir", str(data), "--max_length", "96", "--eval_batch_size", "4"]
    run = tmp_path / "spul"
    spul.main(["--model_name", sharp_model_dir, "--output_path", str(run), "--num_epochs", "1", "--train_batch_size", "8",
               "--lr", "1e-2", "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "8", *common])
    evals = {}
    for name, extra in (("prompt", []), ("noprompt", ["--no_prompt"])):
        inference_spul.main(["--model_checkpoints", str(run), "--protocol", "generate", "--output_path", str(tmp_path / name),
                             *extra, *common])
        evals[name] = [json.loads((tmp_path / name / f).read_text()) for f in ("metrics.json", "manifest.json")]
    (with_prompt, manifest), (without, manifest_np) = evals["prompt"], evals["noprompt"]
    assert manifest["prompt_used"] and not manifest_np["prompt_used"] and manifest["protocol"] == "generate"
    assert list(with_prompt) == list(EVAL_SPLITS)
    assert [m["examples"] for m in with_prompt.values()] != [m["examples"] for m in without.values()]

    loaded, _ = load_checked(str(run), "cpu", False)
    test = pd.read_csv(data / "test_forget.csv")
    test["label_text"] = [LABEL_WORDS[i] for i in test["label"]]
    texts, _ = generate_predictions(loaded.model, Encoder(loaded.tokenizer, 96), test, 4, "cpu", prompt=loaded.prompt)
    assert with_prompt["test_forget"]["examples"] == texts[:5]


def test_cli_max_new_tokens_below_one_is_refused_before_any_model_loads(sharp_model_dir, tmp_path, capsys, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the input checks finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    data = write_splits(tmp_path / "data")
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as e:
        inference_spul.main(["--model_name", sharp_model_dir, "--data_dir", str(data), "--protocol", "generate",
                             "--max_new_tokens", "0", "--output_path", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max_new_tokens 0" in err
    assert not out.exists()
