"""Training-free unlearning baselines: a fixed hard-text prefix placed before every input, or a
filter in front of the model.

- ``instruction_prompt`` (Thaker et al. 2024, "Guardrail baselines for unlearning in LLMs"):
  an instruction that names the forgotten people and the generic label to answer with
  (``INSTRUCTION``, ``INSTRUCTION_LABEL``).
- ``in_context`` (in-context unlearning, Pawelczyk et al., ICML 2024): a few train_forget
  examples with generic labels and a few train_retain examples with their true labels, each in
  the task template (``utils.task.Task.render``), in a seeded order.
- ``name_filter`` (the input filter of Thaker et al. 2024): an input that names a forgotten person
  (``utils.splits.name_pattern``: whole words, any case) never reaches the model; the answer is
  the generic label (``NameFilter``). It catches exactly the spellings it was given.

Building the prefix text is pure (no model). A prefix becomes prompt embeddings by looking its
token ids up in the model's input embedding table (``prefix_embeddings``); passed as
``prompt=`` to ``utils.evaluation.evaluate_splits`` (a ``utils.forward.PromptCache``, whose text
positions continue after the prefix) that is exactly prepending those tokens to every input.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils.augment import AugmentError, forgotten_names, subjects_from_split
from utils.data import DataConfig, locate
from utils.cli import UsageError
from utils.forward import unwrap
from utils.runs import RunError
from utils.splits import clean_names, name_pattern, sha256_file
from utils.task import Task

# The instruction_prompt prefix is the task's (``Task.instruction``): {names} is the
# comma-separated list of forgotten names (or subjects), {label} the generic label it asks for.
INSTRUCTION_LABEL = "unknown"  # one of every shipped task's generic labels

ICL_DEFAULT = 4  # default of --icl_forget and --icl_retain


@dataclass(frozen=True)
class GuardrailOptions:
    """What the training-free methods' flags say (``baselines.py``)."""

    forget_names: list[str] | None = None  # --forget_names
    icl_forget: int | None = None  # --icl_forget
    icl_retain: int | None = None  # --icl_retain
    seed: int = 0  # --seed: draws the in-context examples
    data: DataConfig | None = None  # where the split folder's manifest is (the forgotten names)


@dataclass(frozen=True)
class NameFilter:
    """An input filter: a text naming one of ``names`` (``utils.splits.name_pattern``) is answered
    with the generic ``label`` without the model (``utils.evaluation`` applies it)."""

    names: tuple[str, ...]
    label: str = INSTRUCTION_LABEL

    def hits(self, texts) -> np.ndarray:
        """(n,) bool: which texts the filter catches."""
        pattern = name_pattern(list(self.names))
        return np.array([pattern.search(str(t)) is not None for t in texts], dtype=bool)

    def record(self) -> dict:
        return {"filter": "names", "forget_names": list(self.names), "generic_label": self.label}

    @classmethod
    def from_record(cls, record: dict) -> "NameFilter":
        return cls(tuple(record["forget_names"]), record["generic_label"])


@dataclass(frozen=True)
class Guardrail:
    """A method's prefix text (None for a filter), its input filter (None for a prefix) and what
    the manifest records about how it was made."""

    text: str | None
    record: dict
    input_filter: NameFilter | None = None


# ---------------------------------------------------------------------------------------------
# Prefix texts (pure)
# ---------------------------------------------------------------------------------------------


def instruction_text(names: list[str], task: Task, label: str = INSTRUCTION_LABEL) -> str:
    names = clean_names(names)
    if not names:
        raise ValueError("instruction_text: no names")
    if label not in task.generic_labels:
        raise ValueError(f"instruction_text: {label!r} is not a generic label of task {task.name}")
    return task.instruction.format(names=", ".join(names), label=label)


def _balanced(labels: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """``k`` row indices, the classes taken in turn (a seeded class order, seeded rows within a
    class), so the class counts differ by at most one unless a class runs out."""
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    order = list(rng.permutation(sorted(pools)))
    picked: list[int] = []
    while len(picked) < k and any(pools.values()):
        for c in order:
            if pools[c] and len(picked) < k:
                picked.append(int(pools[c].pop(0)))
    return picked


def draw_icl_examples(forget: pd.DataFrame, retain: pd.DataFrame, k_forget: int, k_retain: int, seed: int,
                      task: Task) -> list[dict]:
    """The in-context examples: ``k_forget`` seeded rows of ``forget`` (train_forget), each with
    the generic label ``Task.generic_for`` gives that row (the one random_label and SPUL
    train it toward), and ``k_retain`` class-balanced seeded rows of ``retain`` (train_retain)
    with their true labels, in a seeded order. Each: text, label (the word in the context),
    true_label, side, row (its index in the split)."""
    if k_forget > len(forget) or k_retain > len(retain):
        raise ValueError(f"asked for {k_forget} forget and {k_retain} retain examples, the splits hold {len(forget)} and {len(retain)}")
    rng = np.random.default_rng([seed, 611953])  # own stream, independent of other draws
    generic = task.generic_for(len(forget), seed)
    words = task.label_words
    out = [{"text": forget["text"].iloc[i], "label": generic[i], "true_label": words[forget["label"].iloc[i]],
            "side": "forget", "row": int(i)} for i in sorted(rng.choice(len(forget), k_forget, replace=False).tolist())]
    out += [{"text": retain["text"].iloc[i], "label": words[retain["label"].iloc[i]],
             "true_label": words[retain["label"].iloc[i]], "side": "retain", "row": i}
            for i in sorted(_balanced(retain["label"].to_numpy(), k_retain, rng))]
    return [out[i] for i in rng.permutation(len(out))]


def icl_text(examples: list[dict], task: Task) -> str:
    """Each example in the task template, followed by a blank line."""
    return "".join(task.render(e["text"], e["label"]) + "\n\n" for e in examples)


# ---------------------------------------------------------------------------------------------
# From the command line (baselines.py): the prefix of each training-free method
# ---------------------------------------------------------------------------------------------


def guarded_names(options: GuardrailOptions, flag: str) -> list[str]:
    """``--forget_names``, else the names recorded by an entities-recipe split folder, else the
    forgotten subjects a split folder records (wmdp_sciq's). Without any: a one-line error
    naming ``flag``."""
    try:
        names = clean_names(forgotten_names(options.forget_names, options.data))
    except AugmentError:  # no people's names recorded: a topic-based forget set may record its subjects
        data = options.data
        names = clean_names(subjects_from_split(locate(data.dataset, data.data_dir, data.data_root)) or [])
    if not names:
        raise UsageError(
            f"{flag}: no forgotten names (the split folder does not record them: "
            "not built by the entities recipe); pass them with --forget_names NAME ..."
        )
    return names


def instruction_guardrail(options: GuardrailOptions, splits, task: Task,
                          flag: str = "--unlearn_method instruction_prompt") -> Guardrail:
    """The instruction naming ``guarded_names`` and asking for the generic label."""
    names = guarded_names(options, flag)
    return Guardrail(instruction_text(names, task), {"instruction": task.instruction, "generic_label": INSTRUCTION_LABEL,
                                                "forget_names": names})


def name_filter_guardrail(options: GuardrailOptions, splits, task: Task) -> Guardrail:
    """A ``NameFilter`` on ``guarded_names``, answering the generic label; no prefix."""
    names = guarded_names(options, "--unlearn_method name_filter")
    if INSTRUCTION_LABEL not in task.generic_labels:
        raise ValueError(f"name filter: {INSTRUCTION_LABEL!r} is not a generic label of task {task.name}")
    found = NameFilter(tuple(names))
    return Guardrail(None, found.record(), found)


HARD_PREFIXES = ("none", "instruction")  # spul.py --hard_prefix, utils.readout --prefix


def hard_prefix_text(kind: str, forget_names, data: DataConfig, splits, flag: str) -> str | None:
    """A fixed prefix put before a soft prompt or the examples: None for ``"none"``, the
    instruction_prompt baseline's text for ``"instruction"`` (``flag`` names the option in the
    one-line error when no forgotten names are known)."""
    if kind not in HARD_PREFIXES:
        raise ValueError(f"hard prefix {kind!r}: choose from {', '.join(HARD_PREFIXES)}")
    if kind == "none":
        return None
    return instruction_guardrail(GuardrailOptions(forget_names=forget_names, data=data), splits, data.task, flag).text


def in_context_guardrail(options: GuardrailOptions, splits, task: Task) -> Guardrail:
    """``--icl_forget`` examples of train_forget and ``--icl_retain`` of train_retain (never
    validation or test rows), seeded by ``--seed``."""
    for flag, split in (("icl_forget", "train_forget"), ("icl_retain", "train_retain")):
        if getattr(options, flag) > len(splits[split]):
            raise UsageError(f"--{flag} {getattr(options, flag)}: {split} holds only {len(splits[split])} rows")
    examples = draw_icl_examples(splits["train_forget"], splits["train_retain"], options.icl_forget, options.icl_retain, options.seed, task)
    return Guardrail(icl_text(examples, task), {"icl_forget": options.icl_forget, "icl_retain": options.icl_retain, "examples": examples})


# ---------------------------------------------------------------------------------------------
# Prefix -> prompt embeddings
# ---------------------------------------------------------------------------------------------


def prefix_ids(tokenizer, text: str) -> list[int]:
    """The prefix's token ids: whatever special tokens the tokenizer puts in front of every text
    (Llama's <s>, OPT's </s>; as ``utils.template.Encoder`` finds them), then the text without
    special tokens. The example after it keeps its own leading special tokens, since every
    method encodes its inputs the same way: with a BOS tokenizer the model reads
    ``<s> prefix <s> ### Text: ...``, the second BOS separating the prefix from the example
    like a document boundary in packed pretraining data."""
    front = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return front + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


@torch.no_grad()
def prefix_embeddings(model, tokenizer, text: str) -> torch.Tensor:
    """(p, d): the rows of the model's input embedding table for ``prefix_ids``."""
    table = unwrap(model).get_input_embeddings()
    ids = torch.tensor(prefix_ids(tokenizer, text), dtype=torch.long, device=table.weight.device)
    return table(ids).detach().clone()


# ---------------------------------------------------------------------------------------------
# A prefix in a run folder (training-free baselines; SPUL's --hard_prefix)
# ---------------------------------------------------------------------------------------------

PREFIX_FILE = "prefix.txt"


def save_prefix(folder, tokenizer, text: str) -> dict:
    """Write ``prefix.txt`` (UTF-8, verbatim) into ``folder``; returns its hashes (text and token
    ids) and length for the manifest."""
    ids = prefix_ids(tokenizer, text)
    path = Path(folder) / PREFIX_FILE
    path.write_bytes(text.encode("utf-8"))
    return {"prefix": PREFIX_FILE, "prefix_sha256": sha256_file(path), "prefix_tokens": len(ids),
            "prefix_ids_sha256": ids_sha256(ids)}


def read_prefix(run_dir, record: dict, tokenizer) -> str:
    """The prefix text a run folder saved with ``save_prefix`` (``record`` is what that returned),
    checked against its hashes: the file's and the token ids the tokenizer gives now."""
    path = Path(run_dir) / record["prefix"]
    if not path.is_file() or sha256_file(path) != record["prefix_sha256"]:
        raise RunError(f"--model_checkpoints {run_dir}: {record['prefix']} is missing or does not match the manifest hash")
    text = path.read_bytes().decode("utf-8")
    if ids_sha256(prefix_ids(tokenizer, text)) != record["prefix_ids_sha256"]:
        raise RunError(f"--model_checkpoints {run_dir}: its tokenizer no longer gives the prefix's recorded token ids")
    return text
