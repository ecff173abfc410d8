"""Counterfactual retain samples for entity unlearning (``spul.py --counterfactual_retain``).

When the forget set is "every text naming one of these people", a soft prompt trained on a few
forget texts per person tends to learn "the text names someone" instead of "the text names one
of *these* people", and then answers unseen retain texts that name anyone else with a generic
label. Each counterfactual sample is a forget text with every forgotten name replaced by a name
from ``SWAP_POOL`` (drawn with the run's seed), keeping the text's true sentiment label. It joins
the retain side of the loss (L_r and L_kl), so the prompt is trained to answer it normally: the
same sentence with another name is not to be forgotten.

``forget_name_swaps`` (``spul.py --forget_swaps K``) is the forget-side twin: each forget text
is copied K times with every forgotten name replaced by *another forgotten* name (seeded), and the
copies join the forget side of the loss (L_f, generic labels). A person named in two training
reviews is then seen in 2(K+1) contexts, and each context with several people, so the prompt is
pushed to key on the names rather than on the wording of the few reviews that name them. With
the counterfactual copies, the same sentence is to be forgotten with a forgotten name and answered
with a made-up one.

``forget_name_typos`` (``spul.py --forget_typos K``) copies each forget text K times with every
forgotten name misspelled (one seeded letter-level edit: a letter dropped, doubled or replaced), to
the forget side of the loss. A prompt trained on the exact spellings alone answers most reviews
again once a name carries one typo (``utils.probes`` name_typo, which swaps two letters); the
copies ask it to forget near-miss spellings too, and the probe's swaps, never trained on, measure
how far that carries.

``pseudo_labelled`` (``spul.py --pseudo_retain N``) adds retain texts the prompt would otherwise
never see: N rows from the part of the training pool that no split uses
(``utils.data.unused_retain``), each labelled with the frozen model's own answer without the
prompt (the argmax over the task labels; the true labels are not read). They join the retain side
of the loss like the counterfactual rows, so L_r and L_kl also hold the prompt to the model's
behaviour on reviews outside the small training set.

The forgotten names come from ``--forget_names`` or from the manifest of a split folder built by
the ``entities`` recipe (the embedded ``rt`` dataset is one).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from utils.data import DataError, encode_frame, locate
from utils.evaluation import label_token_ids, predict
from utils.splits import MANIFEST, name_pattern

# Replacement names: common first and last names, none of them a public figure of film or
# letters, so that a swapped text names "someone else" and nobody the model knows well.
SWAP_POOL = [
    "Anna Keller", "Ben Thornton", "Carla Jensen", "David Okafor", "Elena Marsh", "Frank Delaney",
    "Grace Whitfield", "Henry Caldwell", "Irene Novak", "James Porter", "Karen Lindqvist", "Leo Ramsey",
    "Maria Castell", "Nathan Brooks", "Olivia Hartley", "Paul Mercer", "Rachel Dunn", "Samuel Hayes",
    "Teresa Vogel", "Victor Lamb", "Wendy Sutton", "Adrian Fleming", "Beth Calloway", "Colin Barrett",
    "Diana Morrow", "Edward Pryce", "Fiona Gallagher", "George Whitman", "Helen Stroud", "Ian Radford",
]


class AugmentError(DataError):
    """Bad input for the counterfactual retain set; the message names the flag at fault."""


def names_from_split(where) -> list[str] | None:
    """The forgotten names recorded in a split folder's manifest (entities recipe), else None."""
    if not isinstance(where, Path) or not (where / MANIFEST).is_file():
        return None
    manifest = json.loads((where / MANIFEST).read_text())
    if manifest.get("recipe") != "entities":
        return None
    return list(manifest.get("params", {}).get("names") or []) or None


def subjects_from_split(where) -> list[str] | None:
    """The forgotten subjects a split folder's manifest records under ``names`` (a topic-based
    forget set such as wmdp_sciq's), else None. Not people's names: only the instruction
    guardrail uses them."""
    if not isinstance(where, Path) or not (where / MANIFEST).is_file():
        return None
    return list(json.loads((where / MANIFEST).read_text()).get("names") or []) or None


def swap_names(text: str, pattern, rng: np.random.Generator, pool: list[str]) -> str:
    """``text`` with each match of ``pattern`` replaced by one pool name (drawn once per text):
    a one-word match (a surname) gets the pool name's last word, a longer match the full name."""
    new = pool[rng.integers(len(pool))]
    return pattern.sub(lambda m: new.split()[-1] if len(m.group(0).split()) == 1 else new, text)


def counterfactual_retain(forget: pd.DataFrame, names: list[str], seed: int, pool: list[str] = SWAP_POOL,
                          share: float = 1.0) -> pd.DataFrame:
    """One row per forget text that names someone in ``names``: the text with those names
    swapped for pool names (seeded), with its true label. Rows naming nobody are dropped; with
    ``share`` < 1 a seeded subset of that many of them (at least one) is kept."""
    if not 0 < share <= 1:
        raise AugmentError(f"--counterfactual_retain {share}: the share of forget texts must be in (0, 1]")
    pattern = name_pattern(names)
    clean = [p for p in pool if not pattern.search(p)]
    if not clean:
        raise AugmentError("--forget_names: every replacement name in the pool is itself a forgotten name")
    rng = np.random.default_rng([seed, 104729])  # own stream, independent of other draws
    rows = forget[forget["text"].map(lambda t: pattern.search(t) is not None)]
    if rows.empty:
        raise AugmentError("--counterfactual_retain: no train_forget text names any of the forgotten names")
    out = rows.copy()
    out["text"] = [swap_names(t, pattern, rng, clean) for t in rows["text"]]
    if share < 1:
        keep = np.sort(rng.choice(len(out), max(1, round(share * len(out))), replace=False))
        out = out.iloc[keep]
    return out.reset_index(drop=True)


def forget_name_swaps(forget: pd.DataFrame, names: list[str], seed: int, copies: int) -> pd.DataFrame:
    """``copies`` rows per forget text that names someone in ``names``, each with every forgotten
    name replaced by the full form of one other forgotten name (seeded; never the name the text
    first matches), so that every copy is still a forget text. Labels are kept: the caller
    relabels forget rows with generic labels. Needs at least two forgotten names."""
    if copies < 1:
        raise AugmentError(f"--forget_swaps {copies}: must be at least 1")
    if len(set(names)) < 2:
        raise AugmentError("--forget_swaps: needs at least two forgotten names to swap between")
    pattern = name_pattern(names)
    rng = np.random.default_rng([seed, 130363])  # own stream, independent of other draws
    rows = forget[forget["text"].map(lambda t: pattern.search(t) is not None)]
    if rows.empty:
        raise AugmentError("--forget_swaps: no train_forget text names any of the forgotten names")
    key = lambda name: " ".join(name.lower().split())  # noqa: E731  (match text vs name)
    out = pd.concat([rows] * copies, ignore_index=True)
    swapped = []
    for text in out["text"]:
        first = key(pattern.search(text).group(0))
        pool = [n for n in names if key(n) != first]
        new = pool[rng.integers(len(pool))]  # in full: a surname alone may not be a forgotten name
        swapped.append(pattern.sub(lambda m, new=new: new, text))
    out["text"] = swapped
    return out[["text", "label", "label_text"]]


# --forget_typos: the letter-level edits drawn from. Swapping two adjacent letters is left out on
# purpose: it is the name_typo probe's edit (utils/probes.py), which then measures how far the
# forgetting carries to a kind of misspelling the prompt never trained on.
TYPO_EDITS = ("drop", "double", "replace")
MIN_TYPO_LETTERS = 4  # letters a word needs before it gets a typo (here and in the name_typo probe)


def random_typo(word: str, rng: np.random.Generator) -> str:
    """One seeded letter-level edit of ``word`` at a random inner letter (never the first or the
    last character): drop it, double it, or replace it with another lower-case letter. Words with
    fewer than ``MIN_TYPO_LETTERS`` letters come back unchanged; every other word comes back
    changed, and never by a change of case alone (the name_case probe stays unseen too)."""
    if sum(c.isalpha() for c in word) < MIN_TYPO_LETTERS:
        return word
    kind = TYPO_EDITS[rng.integers(len(TYPO_EDITS))]
    i = int(rng.choice([i for i in range(1, len(word) - 1) if word[i].isalpha()]))
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i + 1] + word[i] + word[i + 1:]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != word[i].lower()]
    return word[:i] + letters[rng.integers(len(letters))] + word[i + 1:]


def typo_in_name(name: str, rng: np.random.Generator) -> str:
    """``name`` with a ``random_typo`` in one of its words of at least ``MIN_TYPO_LETTERS`` letters
    (drawn); a name without such a word comes back unchanged."""
    words = name.split(" ")
    long = [k for k, w in enumerate(words) if sum(c.isalpha() for c in w) >= MIN_TYPO_LETTERS]
    if not long:
        return name
    k = int(rng.choice(long))
    words[k] = random_typo(words[k], rng)
    return " ".join(words)


def forget_name_typos(forget: pd.DataFrame, names: list[str], seed: int, copies: int) -> pd.DataFrame:
    """``copies`` rows per forget text that names someone in ``names``, each with every match of a
    forgotten name misspelled by ``typo_in_name`` (each match drawn on its own, seeded), so that the
    prompt sees the people under near-miss spellings too. Labels are kept: the caller relabels
    forget rows with generic labels."""
    if copies < 1:
        raise AugmentError(f"--forget_typos {copies}: must be at least 1")
    pattern = name_pattern(names)
    rng = np.random.default_rng([seed, 151007])  # own stream, independent of other draws
    rows = forget[forget["text"].map(lambda t: pattern.search(t) is not None)]
    if rows.empty:
        raise AugmentError("--forget_typos: no train_forget text names any of the forgotten names")
    out = pd.concat([rows] * copies, ignore_index=True)
    out["text"] = [pattern.sub(lambda m: typo_in_name(m.group(0), rng), t) for t in out["text"]]
    return out[["text", "label", "label_text"]]


def forgotten_names(forget_names, data) -> list[str]:
    """``--forget_names`` if given, else the names in the manifest of the split folder that
    ``data`` (a ``utils.data.DataConfig``) reads."""
    if forget_names:
        return list(forget_names)
    names = names_from_split(locate(data.dataset, data.data_dir, data.data_root))
    if not names:
        raise AugmentError(
            "--forget_names: the split does not record its forgotten names "
            "(not built by the entities recipe); pass them with --forget_names"
        )
    return names


def describe_pseudo(info: dict) -> str:
    """One line for the log: the pseudo-labelled rows and their labels (``pseudo_labelled``'s summary)."""
    return f"pseudo-labelled retain rows: {info['rows']} ({', '.join(f'{w} {n}' for w, n in info['label_counts'].items())})"


def pseudo_labelled(model, encoder, rows: pd.DataFrame, batch_size: int, device) -> tuple[pd.DataFrame, dict]:
    """``rows`` relabelled with ``model``'s answer (eval mode, no prompt): per row the argmax over
    the task labels' first tokens at the label position. Every row is encoded with the first
    label word as a placeholder, so the true labels are never read here. Returns the frame and
    a summary for the manifest: rows, label counts and a content hash of the texts."""
    task = encoder.task
    feats = encode_frame(encoder, rows, is_forget=False, targets=[task.label_words[0]] * len(rows))
    was_training = model.training
    model.eval()
    preds = predict(model, feats, batch_size, device, encoder.tokenizer.pad_token_id,
                    task_ids=label_token_ids(encoder, task.label_words), desc="pseudo labels")
    model.train(was_training)
    out = rows[["text"]].copy()
    out["label"] = preds.restricted.astype(int)
    out["label_text"] = [task.label_words[i] for i in out["label"]]
    digest = hashlib.sha256("\n".join(out["text"]).encode()).hexdigest()
    counts = {w: int((out["label"] == i).sum()) for i, w in enumerate(task.label_words)}
    return out.reset_index(drop=True), {"rows": len(out), "label_counts": counts, "texts_sha256": digest}
