"""utils/augment.py: counterfactual retain samples (forget texts with their forgotten names
swapped), forget-side name swaps, forget-side name typos, pseudo-labelled retain rows, where the names come from, and spul.py
--counterfactual_retain, --forget_swaps and --forget_typos end to end."""
import json

import pandas as pd
import pytest
import torch

import spul
from utils.cli import data_config
from tests.conftest import write_splits
import numpy as np

from utils.augment import (AugmentError, counterfactual_retain, forget_name_swaps, forget_name_typos, forgotten_names,
                           names_from_split, pseudo_labelled, random_typo, typo_in_name)
from utils.data import encode_frame, training_set
from utils.probes import typo_name
from utils.forward import full_logits_at_labels, label_hidden
from utils.splits import name_pattern
from tests.tiny import tiny_tokenizer
from utils.template import Encoder, collate

NAMES = ["Woody Allen", "Spielberg"]
POOL = ["Anna Keller", "Ben Thornton", "Carla Jensen"]
FORGET = pd.DataFrame({
    "text": ["Woody Allen is at his best here.", "A dull Spielberg film; spielberg's worst.", "Nobody named."],
    "label": [1, 0, 0],
    "label_text": ["positive", "negative", "negative"],
})


def test_swaps_every_forgotten_name_and_keeps_the_label():
    out = counterfactual_retain(FORGET, NAMES, seed=0, pool=POOL)
    assert len(out) == 2  # the row naming nobody is dropped
    assert list(out["label"]) == [1, 0] and list(out["label_text"]) == ["positive", "negative"]
    pattern = name_pattern(NAMES)
    assert not any(pattern.search(t) for t in out["text"])
    first, second = out["text"]
    # a two-word name becomes a full pool name, a surname a pool surname; one pool name per text
    full = [p for p in POOL if first == f"{p} is at his best here."]
    assert len(full) == 1
    surname = [p.split()[-1] for p in POOL if second == f"A dull {p.split()[-1]} film; {p.split()[-1]}'s worst."]
    assert len(surname) == 1


def test_seeded():
    many = pd.concat([FORGET.iloc[:2]] * 20, ignore_index=True)
    a = counterfactual_retain(many, NAMES, seed=1, pool=POOL)
    assert a.equals(counterfactual_retain(many, NAMES, seed=1, pool=POOL))
    assert not a.equals(counterfactual_retain(many, NAMES, seed=2, pool=POOL))


def test_pool_names_that_are_forgotten_are_never_used():
    out = counterfactual_retain(FORGET, NAMES, seed=0, pool=["Steven Spielberg", "Anna Keller"])
    assert list(out["text"]) == ["Anna Keller is at his best here.", "A dull Keller film; Keller's worst."]
    with pytest.raises(AugmentError, match="--forget_names"):
        counterfactual_retain(FORGET, NAMES, seed=0, pool=["Woody Allen"])


def test_no_forget_text_names_anyone():
    with pytest.raises(AugmentError, match="--counterfactual_retain"):
        counterfactual_retain(FORGET.iloc[2:], NAMES, seed=0, pool=POOL)


def test_names_from_split_manifest(tmp_path):
    assert names_from_split(tmp_path) is None  # no manifest
    assert names_from_split("glue/sst2") is None  # a hub id
    (tmp_path / "manifest.json").write_text(json.dumps({"recipe": "groups", "params": {"group_col": "movie"}}))
    assert names_from_split(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"recipe": "entities", "params": {"names": NAMES}}))
    assert names_from_split(tmp_path) == NAMES


def test_forgotten_names_flag_first_then_manifest(tmp_path):
    folder = write_splits(tmp_path / "d")
    args = spul.build_parser().parse_args(["--data_dir", str(folder), "--counterfactual_retain"])
    with pytest.raises(AugmentError, match="--forget_names"):
        forgotten_names(args.forget_names, data_config(args))
    (folder / "manifest.json").write_text(json.dumps({"recipe": "entities", "params": {"names": NAMES}}))
    assert forgotten_names(args.forget_names, data_config(args)) == NAMES
    args.forget_names = ["Someone Else"]
    assert forgotten_names(args.forget_names, data_config(args)) == ["Someone Else"]


def test_training_set_puts_extra_rows_on_the_retain_side():
    encoder = Encoder(tiny_tokenizer(), 64)
    splits = {"train_retain": FORGET.iloc[2:], "train_forget": FORGET.iloc[:2]}
    extra = counterfactual_retain(FORGET, NAMES, seed=0, pool=POOL)
    feats = training_set(encoder, splits, seed=0, relabel_forget=True, extra_retain=extra)
    assert [f["is_forget"] for f in feats] == [False, False, False, True, True]
    assert [f["label"] for f in feats[1:3]] == [1, 0]
    # the counterfactual rows are scored on their true label word, the forget rows on a generic one
    positive = encoder.encode(extra["text"][0], "positive")[1]
    assert feats[1]["label_ids"] == positive


def forget_frame(rows=12):
    people = ["Woody Allen", "Spielberg", "Godard"]
    return pd.DataFrame({
        "text": [f"{people[i % 3]} made a {'fine' if i % 2 else 'poor'} film, number {i}." for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    })


def test_spul_cli_trains_on_counterfactual_rows(tmp_path, tiny_model_dir, capsys):
    folder = write_splits(tmp_path / "d", train_forget=forget_frame())
    args = ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--max_length", "64", "--num_epochs", "1",
            "--train_batch_size", "8", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8",
            "--eval_batch_size", "8", "--cache_reference"]
    with pytest.raises(SystemExit) as e:  # no manifest and no --forget_names: one line, nothing written
        spul.main(args + ["--counterfactual_retain", "--output_path", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --forget_names: the split does not record") and "\n" not in err
    assert not (tmp_path / "bad").exists()

    spul.main(args + ["--counterfactual_retain", "--forget_names", "Woody Allen", "Spielberg", "Godard",
                      "--output_path", str(tmp_path / "cf")])
    stats = json.loads((tmp_path / "cf" / "train_stats.json").read_text())
    config = json.loads((tmp_path / "cf" / "config.json").read_text())
    assert config["counterfactual_retain"] == 1.0 and config["forget_names"] == ["Woody Allen", "Spielberg", "Godard"]
    # the validation carve (5%, at least one row) leaves 7 retain and 11 forget rows:
    # 7 retain + 11 counterfactual + 11 forget = 29 samples: 4 steps of 8, and 18 retain rows
    # reach the reference cache (the counterfactual ones are retain rows)
    assert stats["steps"] == 4
    assert stats["kl_reference"]["reference_cache_misses"] == 18


def test_forget_names_alone_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        spul.main(["--forget_names", "X", "--output_path", str(tmp_path / "o")])
    assert e.value.code == 2 and "--forget_names" in capsys.readouterr().err


def test_share_keeps_a_seeded_subset_of_the_same_swaps():
    many = pd.concat([FORGET.iloc[:2]] * 10, ignore_index=True)
    full = counterfactual_retain(many, NAMES, seed=3, pool=POOL)
    half = counterfactual_retain(many, NAMES, seed=3, pool=POOL, share=0.5)
    assert len(full) == 20 and len(half) == 10
    assert set(half["text"]) <= set(full["text"])  # the kept rows carry the same swapped text
    assert len(counterfactual_retain(many, NAMES, seed=3, pool=POOL, share=0.01)) == 1
    for bad in (0, 1.5):
        with pytest.raises(AugmentError, match="--counterfactual_retain"):
            counterfactual_retain(many, NAMES, seed=3, pool=POOL, share=bad)


def test_share_flag_parses_and_is_checked(tmp_path, capsys):
    parse = spul.build_parser().parse_args
    assert parse([]).counterfactual_retain == 0.0
    assert parse(["--counterfactual_retain"]).counterfactual_retain == 1.0
    assert parse(["--counterfactual_retain", "0.5"]).counterfactual_retain == 0.5
    with pytest.raises(SystemExit) as e:
        spul.main(["--counterfactual_retain", "2", "--output_path", str(tmp_path / "o")])
    assert e.value.code == 2 and "--counterfactual_retain 2" in capsys.readouterr().err


THREE = ["Woody Allen", "Spielberg", "Godard"]


def test_forget_swaps_use_another_forgotten_name_in_full():
    out = forget_name_swaps(FORGET, THREE, seed=0, copies=2)
    assert len(out) == 4  # two copies of the two rows that name someone; "Nobody named." dropped
    assert list(out["label"]) == [1, 0, 1, 0] and list(out["label_text"]) == ["positive", "negative"] * 2
    pattern = name_pattern(THREE)
    for text in out["text"]:
        assert pattern.search(text)  # every copy is still a forget text
    # row 0 names Woody Allen: its copies name Spielberg or Godard in full, never Woody Allen
    for text in out["text"][::2]:
        assert text in ("Spielberg is at his best here.", "Godard is at his best here.")
    # row 1 names Spielberg twice (two spellings): both become the same other name
    for text in out["text"][1::2]:
        assert text in ("A dull Woody Allen film; Woody Allen's worst.", "A dull Godard film; Godard's worst.")


@pytest.mark.parametrize("copy_fn, flag", [(forget_name_swaps, "--forget_swaps"), (forget_name_typos, "--forget_typos")])
def test_forget_copies_seeded_and_checked(copy_fn, flag):
    many = pd.concat([FORGET.iloc[:2]] * 20, ignore_index=True)
    a = copy_fn(many, THREE, seed=1, copies=1)
    assert a.equals(copy_fn(many, THREE, seed=1, copies=1))
    assert not a.equals(copy_fn(many, THREE, seed=2, copies=1))
    with pytest.raises(AugmentError, match=f"{flag} 0: must be at least 1"):
        copy_fn(many, THREE, seed=1, copies=0)
    with pytest.raises(AugmentError, match=f"{flag}: no train_forget text"):
        copy_fn(FORGET.iloc[2:], THREE, seed=1, copies=1)


def test_forget_swaps_need_two_names():
    with pytest.raises(AugmentError, match="two forgotten names"):
        forget_name_swaps(FORGET, ["Spielberg"], seed=1, copies=1)


def test_training_set_puts_swapped_rows_on_the_forget_side_without_moving_the_forget_draw():
    encoder = Encoder(tiny_tokenizer(), 64)
    many = pd.concat([FORGET.iloc[:2]] * 6, ignore_index=True)
    many["label_text"] = ["positive" if l else "negative" for l in many["label"]]
    splits = {"train_retain": FORGET.iloc[2:], "train_forget": many}
    swaps = forget_name_swaps(many, THREE, seed=0, copies=1)
    plain = training_set(encoder, splits, seed=5, relabel_forget=True)
    feats = training_set(encoder, splits, seed=5, relabel_forget=True, extra_forget=swaps)
    assert len(feats) == len(plain) + len(swaps)
    assert feats[: len(plain)] == plain  # train_forget keeps the generic labels it had without swaps
    generic = {tuple(encoder.encode(swaps["text"][0], g)[1]) for g in encoder.task.generic_labels}
    for f, text in zip(feats[len(plain):], swaps["text"]):
        assert f["is_forget"]
        assert tuple(f["label_ids"]) in {tuple(encoder.encode(text, g)[1]) for g in encoder.task.generic_labels}
    assert len(generic) == 2


def test_spul_cli_trains_on_swapped_forget_rows(tmp_path, tiny_model_dir):
    folder = write_splits(tmp_path / "d", train_forget=forget_frame())
    args = ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--max_length", "64", "--num_epochs", "1",
            "--train_batch_size", "8", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8",
            "--eval_batch_size", "8", "--forget_swaps", "2", "--forget_names", *THREE, "--output_path", str(tmp_path / "sw")]
    spul.main(args)
    stats = json.loads((tmp_path / "sw" / "train_stats.json").read_text())
    config = json.loads((tmp_path / "sw" / "config.json").read_text())
    assert config["forget_swaps"] == 2
    # 7 retain + 11 forget + 2 x 11 swapped forget = 40 samples: 5 steps of 8; only the 7 retain
    # rows reach the reference cache
    assert stats["steps"] == 5
    assert stats["kl_reference"]["reference_cache_misses"] == 7


class FixedDraws:
    """Stands in for numpy's Generator: ``integers`` and ``choice`` return the given draws in order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def integers(self, n):
        k = self.draws.pop(0)
        assert 0 <= k < n
        return k

    def choice(self, options):
        k = self.draws.pop(0)
        return list(options)[k]


def test_random_typo_edits_by_hand():
    # the edit kind (drop, double, replace), the inner position, then (replace) the new letter
    assert random_typo("Allen", FixedDraws(0, 1)) == "Alen"  # drop "Allen"[2]: inner positions are 1, 2, 3
    assert random_typo("Allen", FixedDraws(0, 2)) == "Alln"  # drop the "e"
    assert random_typo("Allen", FixedDraws(1, 2)) == "Alleen"  # double the "e"
    assert random_typo("Allen", FixedDraws(2, 0, 0)) == "Aalen"  # replace the first "l" by "a"
    assert random_typo("Allen", FixedDraws(2, 0, 11)) == "Amlen"  # "a".."z" without "l": index 11 is "m"
    assert random_typo("Lee", FixedDraws()) == "Lee"  # under 4 letters: no draw, no change
    assert random_typo("O'Hara", FixedDraws(0, 1)) == "O'Hra"  # inner letters only: the apostrophe is never picked


def test_random_typo_always_changes_a_long_word_and_keeps_its_ends():
    rng = np.random.default_rng(0)
    for word in ["Spielberg", "Allen", "Niro", "Madonna", "Scorsese"]:
        for _ in range(200):
            new = random_typo(word, rng)
            assert new != word and new[0] == word[0] and new[-1] == word[-1]
            assert abs(len(new) - len(word)) <= 1
            assert new.lower() != word.lower()  # never a case change alone
            assert new != typo_name(word)  # never the name_typo probe's swap


def test_typo_in_name_edits_one_long_word():
    rng = np.random.default_rng(3)
    for _ in range(100):
        new = typo_in_name("De Niro", rng)
        assert new.startswith("De ") and new != "De Niro"  # "De" is too short for a typo
    assert typo_in_name("Ang Lee", rng) == "Ang Lee"


def test_forget_typos_misspell_every_match_and_keep_labels():
    out = forget_name_typos(FORGET, NAMES, seed=0, copies=3)
    assert len(out) == 6 and list(out["label"]) == [1, 0] * 3  # "Nobody named." dropped
    pattern = name_pattern(NAMES)
    for text in out["text"]:
        assert not pattern.search(text)  # no exact spelling survives, both spellings of Spielberg included
    assert out["text"][0] != out["text"][2] or out["text"][2] != out["text"][4]  # the copies differ


def test_spul_cli_trains_on_misspelled_forget_rows(tmp_path, tiny_model_dir):
    folder = write_splits(tmp_path / "d", train_forget=forget_frame())
    args = ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--max_length", "64", "--num_epochs", "1",
            "--train_batch_size", "8", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8",
            "--eval_batch_size", "8", "--forget_names", *THREE]
    spul.main(args + ["--forget_typos", "1", "--output_path", str(tmp_path / "ty")])
    stats = json.loads((tmp_path / "ty" / "train_stats.json").read_text())
    assert json.loads((tmp_path / "ty" / "config.json").read_text())["forget_typos"] == 1
    # 7 retain + 11 forget + 11 misspelled forget = 29 samples: 4 steps of 8
    assert stats["steps"] == 4 and stats["kl_reference"]["reference_cache_misses"] == 7
    # with --forget_swaps 2 too: 7 + 11 + 22 + 11 = 51 samples, 7 steps
    spul.main(args + ["--forget_typos", "1", "--forget_swaps", "2", "--output_path", str(tmp_path / "both")])
    assert json.loads((tmp_path / "both" / "train_stats.json").read_text())["steps"] == 7


def test_forget_typos_flag_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        spul.main(["--forget_typos", "-1", "--output_path", str(tmp_path / "o")])
    assert e.value.code == 2 and "--forget_typos -1: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pseudo_labels_are_the_frozen_models_answers_not_the_true_labels(tiny_model_dir):
    from utils.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, "cpu", tokenizer=tok)
    encoder = Encoder(tok, 64)
    texts = [f"review {i}: {'quite good fun' if i % 3 else 'rather dull and bad'} {'!' * (i % 4)}" for i in range(10)]
    task_ids = [encoder.label_ids(w)[0] for w in encoder.task.label_words]
    # a random tiny model gives every row nearly the same label-position state: point the
    # "negative" row of the head along how the rows differ, so that both answers occur
    feats = encode_frame(encoder, pd.DataFrame({"text": texts, "label": [0] * 10, "label_text": ["negative"] * 10}), False)
    with torch.no_grad():
        hidden = torch.stack([label_hidden(model.eval(), collate([f], tok.pad_token_id))[0, 0] for f in feats])
        mean = hidden.mean(0)
        spread = hidden[0] - mean
        spread -= (spread @ mean) / (mean @ mean) * mean
        head = model.get_output_embeddings().weight
        head[task_ids[0]] = head[task_ids[1]] + spread / spread.norm() ** 2 * 50
    rows = pd.DataFrame({"text": texts, "label": [i % 2 for i in range(10)]})
    rows["label_text"] = ["positive" if l else "negative" for l in rows["label"]]
    out, info = pseudo_labelled(model.train(), encoder, rows, batch_size=4, device="cpu")
    assert model.training  # left as it was
    model.eval()
    want = []
    for text in texts:  # one row at a time, the naive full-logits path
        feats = encode_frame(encoder, pd.DataFrame({"text": [text], "label": [0], "label_text": ["negative"]}), False)
        logits = full_logits_at_labels(model, collate(feats, tok.pad_token_id))[0, 0]
        want.append(int(logits[task_ids].argmax()))
    assert list(out["label"]) == want and list(out["text"]) == texts
    assert len(set(want)) == 2, want  # both answers occur, so the comparison tells rows apart
    assert list(out["label_text"]) == [encoder.task.label_words[i] for i in want]
    assert info["rows"] == 10 and sum(info["label_counts"].values()) == 10
    flipped = rows.assign(label=1 - rows["label"], label_text=rows["label_text"][::-1].to_numpy())
    again, info2 = pseudo_labelled(model, encoder, flipped, batch_size=3, device="cpu")
    assert again.equals(out) and info2 == info  # the true labels are never read


def test_spul_cli_adds_pseudo_labelled_rows_to_the_retain_side(tmp_path, tiny_model_dir, capsys):
    folder = write_splits(tmp_path / "d", rows=24)
    args = ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--max_length", "64", "--num_epochs", "1",
            "--train_batch_size", "8", "--ptuning_num_tokens", "2", "--ptuning_hidden_size", "8", "--eval_batch_size", "8",
            "--max_val_retain", "4", "--max_val_forget", "2", "--max_train_retain", "8", "--max_train_forget", "8"]
    with pytest.raises(SystemExit) as e:  # 24 - 4 - 8 = 12 unused rows: 13 is one line, nothing written
        spul.main(args + ["--pseudo_retain", "13", "--output_path", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and err.startswith("error: --pseudo_retain 13") and "\n" not in err
    assert not (tmp_path / "bad").exists()
    spul.main(args + ["--pseudo_retain", "5", "--output_path", str(tmp_path / "p")])
    stats = json.loads((tmp_path / "p" / "train_stats.json").read_text())
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["pseudo_retain"]["rows"] == 5 and sum(manifest["pseudo_retain"]["label_counts"].values()) == 5
    # 8 retain + 5 pseudo-labelled + 8 forget = 21 samples: 3 steps of 8; 13 retain rows reach the reference
    assert stats["steps"] == 3
    assert stats["kl_reference"]["reference_cache_misses"] == 13
