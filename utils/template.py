"""The paper's completion template, tokenisation with text-only truncation, and the
label-masking collator.

Every example becomes ``prefix + text + suffix + label``. Only the label tokens are scored.
A batch (shared by qlora.py, spul.py and baselines.py) is a dict of tensors:

- ``input_ids``, ``attention_mask``: (B, L), right padded;
- ``label_ids``: (B, K) target token ids, ``-100`` where a sample has fewer than K label tokens;
- ``label_pos``: (B, K) the index of the token that *predicts* each label token
  (the label token's own index minus one), 0 where ``label_ids`` is -100;
- ``is_forget``: (B,) bool; ``label``: (B,) the true class index (for metrics);
- ``num_tokens``: (B,) real (non-pad) lengths;
- ``index``: (B,) each sample's ``index`` field (its key into per-sample caches), -1 if absent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX = "### Text: "
SUFFIX = "\n\n### Question: What is the sentiment of the given text?\n\n### Sentiment:"
TEMPLATE = PREFIX + "{text}" + SUFFIX + " {label}"
LABEL_WORDS = ("negative", "positive")  # index = class label
GENERIC_LABELS = ("neutral", "unknown")  # disjoint from LABEL_WORDS (paper §1)
IGNORE = -100


def render(text: str, label_word: str) -> str:
    """The full training string for one example (for display and tests)."""
    return TEMPLATE.format(text=text, label=label_word)


def _ids(tokenizer, s: str) -> list[int]:
    return tokenizer(s, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Encoder:
    """Tokenises examples into ``[bos] prefix text suffix label`` with the text truncated
    first, so that the template and the label always survive ``max_length``."""

    tokenizer: object
    max_length: int
    # the template text between the review and the label (the question line and the answer
    # header); the default is the paper's, a robustness probe may pass a paraphrase
    suffix: str = SUFFIX

    def __post_init__(self):
        tok = self.tokenizer
        # whatever special tokens the tokenizer puts in front of any text (Llama's <s>, OPT's </s>)
        bos = list(tok("", add_special_tokens=True)["input_ids"])
        object.__setattr__(self, "_bos", bos)
        object.__setattr__(self, "_prefix", _ids(tok, PREFIX))
        object.__setattr__(self, "_suffix", _ids(tok, self.suffix))

    def label_ids(self, word: str) -> list[int]:
        return _ids(self.tokenizer, " " + word)

    @property
    def overhead(self) -> int:
        """Tokens taken by the template alone (without text or label)."""
        return len(self._bos) + len(self._prefix) + len(self._suffix)

    def min_length(self, label_words) -> int:
        """Shortest max_length that holds the template, one text token and the longest label."""
        return self.overhead + 1 + max(len(self.label_ids(w)) for w in label_words)

    def encode(self, text: str, label_word: str) -> tuple[list[int], list[int]]:
        """Return (input_ids, label_ids); the label tokens are the last len(label_ids) ids."""
        label = self.label_ids(label_word)
        budget = self.max_length - self.overhead - len(label)
        if budget < 1:
            raise ValueError(
                f"--max_length {self.max_length} is too short: the template and the label "
                f"'{label_word}' alone take {self.overhead + len(label)} tokens"
            )
        text_ids = _ids(self.tokenizer, text)[:budget]
        return self._bos + self._prefix + text_ids + self._suffix + label, label


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded features (``input_ids``, ``label_ids``, ``is_forget``,
    ``label``) into one batch; see the module docstring for the fields."""
    B = len(features)
    L = max(len(f["input_ids"]) for f in features)
    K = max(len(f["label_ids"]) for f in features)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    label_ids = torch.full((B, K), IGNORE, dtype=torch.long)
    label_pos = torch.zeros((B, K), dtype=torch.long)
    for i, f in enumerate(features):
        n, k = len(f["input_ids"]), len(f["label_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        attention_mask[i, :n] = 1
        label_ids[i, :k] = torch.tensor(f["label_ids"])
        # label token j sits at n-k+j and is predicted by the token before it
        label_pos[i, :k] = torch.arange(n - k - 1, n - 1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "label_ids": label_ids,
        "label_pos": label_pos,
        "is_forget": torch.tensor([bool(f.get("is_forget", False)) for f in features]),
        "label": torch.tensor([int(f["label"]) for f in features]),
        "num_tokens": attention_mask.sum(1),
        "index": torch.tensor([int(f.get("index", -1)) for f in features]),
    }
