"""The completion template (the paper's, or a task's: ``utils.task``), tokenisation with
text-only truncation, and the label-masking collator.

Every example is the string ``prefix + text + suffix + " " + label``, tokenised as one string
(with the special tokens the tokenizer puts in front of a text, e.g. BOS), so the ids are the
ones the model reads for that string: the first word of the text keeps its leading-space form,
and the label's tokens are the ones it has in context after the suffix (a SentencePiece
tokenizer such as LLaMA-2's encodes ``" positive"`` on its own as a lone ``▁`` followed by
``▁positive``, but after ``Sentiment:`` as ``▁positive`` alone). When the example is too long
for ``max_length`` the tail of the text's tokens is cut (found through character offsets, so
a fast tokenizer is needed); the template and the label always survive. Only the label tokens
are scored. A batch (shared by qlora.py, spul.py and baselines.py) is a dict of tensors:

- ``input_ids``, ``attention_mask``: (B, L), right padded;
- ``label_ids``: (B, K) target token ids, ``-100`` where a sample has fewer than K label tokens;
- ``label_pos``: (B, K) the index of the token that *predicts* each label token
  (the label token's own index minus one), 0 where ``label_ids`` is -100;
- ``is_forget``: (B,) bool; ``label``: (B,) the true class index (for metrics);
- ``num_tokens``: (B,) real (non-pad) lengths;
- ``index``: (B,) each sample's ``index`` field (its key into per-sample caches), -1 if absent.

``check_labels`` tells, before any training, whether first-label-token evaluation can tell a
set of label words apart under a tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.task import SENTIMENT, Task

IGNORE = -100
# the stand-in text of the reference example from which an Encoder measures its template
# (prefix and suffix tokens, the label tokens in context): one plain word
_REFERENCE_TEXT = "a"


def _ids(tokenizer, s: str) -> list[int]:
    return tokenizer(s, add_special_tokens=False)["input_ids"]


def _front_special_ids(tokenizer, s: str) -> list[int]:
    """The special tokens the tokenizer puts in front of ``s`` (Llama's <s>, OPT's </s>; none
    for SmolLM2). Any it appends after the text are not returned: the label must end the
    sequence (none of the supported models appends any)."""
    plain = list(_ids(tokenizer, s))
    full = list(tokenizer(s, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    raise ValueError(f"{type(tokenizer).__name__}: its special tokens change the tokens of the text itself")


@dataclass(frozen=True)
class Encoder:
    """Tokenises examples into ``[bos] prefix text suffix label``, the whole rendered string
    at once, with the text truncated first, so that the template and the label always survive
    ``max_length``.

    Truncation removes the tail of the text's tokens from the full string's tokens. A token
    that straddles a boundary counts as follows: one holding the end of the prefix and the
    start of the text (byte-level BPE's ``Ġword``, SentencePiece's ``▁word`` after ``### Text: ``)
    is a text token, the first one, which is never cut (at least one text token is kept); one
    holding the end of the text and the start of the suffix (say a final "." merged with the
    suffix's first newline) belongs to the suffix and is always kept. A cut
    does not split a character that byte fallback (or byte-level BPE) spreads over several
    tokens with the same offsets: its pieces go or stay together, so a truncated example can be
    up to three tokens shorter than ``max_length``."""

    tokenizer: object
    max_length: int
    # the template text between the text and the label (the question line and the answer
    # header); None: the task's (the paper's for the sentiment task); a robustness probe may
    # pass a paraphrase
    suffix: str | None = None
    # the template text before the text; None: the task's
    prefix: str | None = None
    # the ``utils.task.Task`` whose examples these are (its label words, generic labels and
    # answer parsing serve data, evaluation and generation); None: the sentiment task
    task: Task | None = None

    def __post_init__(self):
        if self.task is None:
            object.__setattr__(self, "task", SENTIMENT)
        if self.prefix is None:
            object.__setattr__(self, "prefix", self.task.prefix)
        if self.suffix is None:
            object.__setattr__(self, "suffix", self.task.suffix)
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{type(tok).__name__}: the template needs a fast tokenizer (character offsets)")
        prompt = self.prefix + _REFERENCE_TEXT + self.suffix
        # the reference example's tokens: prefix-only tokens, then the text's, then the suffix's
        ids, offsets = self._tokenize(prompt)
        start, end = self._text_span(offsets, len(self.prefix), len(self.prefix) + len(_REFERENCE_TEXT))
        object.__setattr__(self, "_bos", _front_special_ids(tok, prompt))
        object.__setattr__(self, "_prefix", ids[:start])
        object.__setattr__(self, "_suffix", ids[end:])
        object.__setattr__(self, "_prompt_ids", ids)
        object.__setattr__(self, "_labels", {})  # word -> its tokens in context

    def render(self, text: str, label_word: str) -> str:
        """The full string of one example under this encoder's template."""
        return self.prefix + text + self.suffix + " " + label_word

    def _tokenize(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(s, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @staticmethod
    def _text_span(offsets, text_start: int, text_end: int) -> tuple[int, int]:
        """Token indices [start, end) of the text: from the first token holding a character at
        or after ``text_start`` to the first one holding a character at or after ``text_end``
        (exclusive)."""
        n = len(offsets)
        start = next((i for i, (_, e) in enumerate(offsets) if e > text_start), n)
        end = next((i for i in range(start, n) if offsets[i][1] > text_end), n)
        return start, end

    def label_ids(self, word: str) -> list[int]:
        """The tokens of ``word`` as they appear in context, after the suffix and a space:
        what ``prefix + text + suffix + " " + word`` adds to the tokens of the prompt part."""
        cached = self._labels.get(word)
        if cached is not None:
            return list(cached)
        if not word.strip():
            raise ValueError(f"the label {word!r} has no token under this tokenizer")
        full = _ids(self.tokenizer, self.prefix + _REFERENCE_TEXT + self.suffix + " " + word)
        prompt = self._prompt_ids
        if full[: len(prompt)] != prompt:
            raise ValueError(f"the label {word!r} merges with the end of the template under this tokenizer "
                             f"(the prompt's tokens are not a prefix of the full string's)")
        label = full[len(prompt):]
        if not label:
            raise ValueError(f"the label {word!r} has no token under this tokenizer")
        self._labels[word] = tuple(label)
        return list(label)

    @property
    def overhead(self) -> int:
        """Tokens taken by the template alone (without text or label)."""
        return len(self._bos) + len(self._prefix) + len(self._suffix)

    def min_length(self, label_words) -> int:
        """Shortest max_length that holds the template, one text token and the longest label."""
        return self.overhead + 1 + max(len(self.label_ids(w)) for w in label_words)

    def encode(self, text: str, label_word: str) -> tuple[list[int], list[int]]:
        """Return (input_ids, label_ids); the label tokens are the last len(label_ids) ids.
        ``input_ids`` are the tokenizer's ids for the whole rendered string (its front special
        tokens included), with the tail of the text's tokens cut when they do not fit (its head
        for a task that keeps the end of its text, ``Task.truncate == "start"``: MCQA's options)."""
        label = self.label_ids(label_word)
        prompt_end = len(self.prefix) + len(text) + len(self.suffix)
        ids, offsets = self._tokenize(self.render(text, label_word))
        k = len(label)
        if ids[len(ids) - k:] != label or (len(ids) > k and offsets[len(ids) - k - 1][1] > prompt_end):
            raise ValueError(f"the label {label_word!r} merges with the text before it under this tokenizer "
                             f"(the prompt's tokens are not a prefix of the full string's)")
        if len(self._bos) + len(ids) <= self.max_length:
            return self._bos + ids, label
        start, end = self._text_span(offsets, len(self.prefix), len(self.prefix) + len(text))
        keep = self.max_length - len(self._bos) - start - (len(ids) - end)  # text tokens that fit
        if keep < 1:
            raise ValueError(
                f"--max_length {self.max_length} is too short: the template and the label "
                f"'{label_word}' alone take {self.max_length - keep} tokens"
            )
        if self.task.truncate == "start":  # keep the text's last tokens (MCQA: the options)
            first = end - keep
            # do not start inside a character: its byte pieces share its offsets (at most 4 bytes)
            for _ in range(3):
                if first >= end - 1 or offsets[first][0] >= offsets[first - 1][1]:
                    break
                first += 1
            return self._bos + ids[:start] + ids[first:], label
        cut = start + keep
        # do not leave part of a character: the byte pieces of one character (byte fallback,
        # byte-level BPE) share its offsets, and a UTF-8 character has at most 4 bytes
        for _ in range(3):
            if cut <= start + 1 or offsets[cut][0] >= offsets[cut - 1][1]:
                break
            cut -= 1
        return self._bos + ids[:cut] + ids[end:], label


def check_labels(encoder: Encoder, words) -> None:
    """Raise ValueError (one line, naming the words) unless every label word has a token of its
    own in context and no two words share their first token: evaluation reads the argmax at
    the position that predicts the first label token, so such labels could not be told apart."""
    words = list(words)
    firsts: dict[int, list[str]] = {}
    for word in words:
        firsts.setdefault(encoder.label_ids(word)[0], []).append(word)
    for token, group in firsts.items():
        if len(group) > 1:
            piece = encoder.tokenizer.convert_ids_to_tokens(token)
            raise ValueError(f"the labels {', '.join(map(repr, group))} share their first token {piece!r} "
                             f"under this tokenizer: evaluation could not tell them apart")


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
