"""Template, text-only truncation, label masking and the label-predicting positions."""
import pytest
import torch

from tests.tiny import tiny_tokenizer
from utils.template import IGNORE, Encoder, collate
from utils.task import SENTIMENT

LABEL_WORDS = SENTIMENT.label_words
render = SENTIMENT.render


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.pad_token = t.eos_token
    return t


def test_render_matches_paper_template():
    assert render("great film", "positive") == (
        "### Text: great film\n\n### Question: What is the sentiment of the given text?\n\n### Sentiment: positive"
    )


def test_encode_ends_with_label_and_starts_with_bos(tok):
    enc = Encoder(tok, max_length=512)
    ids, lab = enc.encode("a fine film", "positive")
    assert ids[0] == tok.bos_token_id
    assert ids[-len(lab):] == lab == tok(" positive", add_special_tokens=False)["input_ids"]


def test_truncation_cuts_text_only(tok):
    long_text = " ".join("abcdefghij"[i % 10] for i in range(400))  # 400 one-character tokens
    full, _ = Encoder(tok, max_length=1000).encode(long_text, "negative")
    enc = Encoder(tok, max_length=60)
    ids, lab = enc.encode(long_text, "negative")
    assert len(ids) == 60
    n_suffix_and_label = len(enc._suffix) + len(lab)
    assert ids[-n_suffix_and_label:] == full[-n_suffix_and_label:]  # template tail and label intact
    assert ids[: enc.overhead - len(enc._suffix)] == full[: enc.overhead - len(enc._suffix)]  # head intact


def test_too_short_max_length_raises(tok):
    enc = Encoder(tok, max_length=5)
    with pytest.raises(ValueError, match="--max_length 5"):
        enc.encode("text", "positive")
    assert enc.min_length(LABEL_WORDS) > 5


def test_collate_masks_everything_but_labels_and_points_at_predicting_positions():
    feats = [
        {"input_ids": [5, 6, 7, 8], "label_ids": [8], "label": 1},
        {"input_ids": [5, 6, 9, 10, 11], "label_ids": [10, 11], "label": 0, "is_forget": True},
    ]
    b = collate(feats, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 0], [5, 6, 9, 10, 11]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["label_ids"].tolist() == [[8, IGNORE], [10, 11]]
    # token 8 sits at index 3 and is predicted from index 2; tokens 10, 11 (at 3, 4) from 2, 3
    assert b["label_pos"][0, 0].item() == 2 and b["label_pos"][1].tolist() == [2, 3]
    assert b["is_forget"].tolist() == [False, True]
    assert b["num_tokens"].tolist() == [4, 5]
    # the label token id really is the token right after its predicting position
    for i in range(2):
        for k in range(2):
            if b["label_ids"][i, k] != IGNORE:
                assert b["input_ids"][i, b["label_pos"][i, k] + 1] == b["label_ids"][i, k]
