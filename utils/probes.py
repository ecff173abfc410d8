#!/usr/bin/env python
"""Robustness probes for unlearned models: evaluate run folders on the four paper splits
(train_retain, train_forget, test_retain, test_forget) under small, fixed changes of the input,
to see whether forgetting survives them. Writes probes.json and probes.md into --output_path.

Probes (``PROBES``), each changing exactly one thing:

- ``none``: the unprobed input, the reference row;
- ``question_feel``, ``question_polarity``, ``question_express``: the template's question line
  replaced by a paraphrase (``PARAPHRASES``); the ``### Sentiment:`` answer header stays, so the
  label sits where it always does; every text keeps exactly the tokens it keeps under the
  paper's question (the token budget is shifted by the difference in question length);
- ``name_case``, ``name_typo``, ``name_surname``: every occurrence of a forgotten name in the
  texts (``utils.splits.name_pattern``: case-insensitive, whole words) re-spelled; the rest of
  each text, and every text without a forgotten name, is left byte-identical;
- ``no_prompt``: a run with a soft prompt (SPUL, the prefix baselines) evaluated without it
  (``inference_spul.py --no_prompt``); not applicable ("n/a") to a run without one.

A split whose texts a probe leaves unchanged (name probes on the retain splits, which should not
mention a forgotten name: checked on the data, not assumed) is not evaluated again: the ``none``
metrics are reused and the reuse is recorded."""
from __future__ import annotations

import gc
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from utils import cli, distributed
from utils.data import SPLITS
import torch
from utils.augment import MIN_TYPO_LETTERS, names_from_split
from utils.kinds import load_checked, read_run_tokenizer
from utils.data import locate, prepare_splits
from utils.evaluation import evaluate_splits
from utils.models import select_device
from utils.runs import atomic_run_dir, check_output, library_versions, write_json
from utils.splits import name_pattern
from utils.task import SENTIMENT
from utils.template import Encoder
from utils.training import seed_everything

DEFAULT_QUESTION = "What is the sentiment of the given text?"  # the paper's (utils.task.SENTIMENT.suffix)
QUESTION_HEADER = "\n\n### Question: "
ANSWER_HEADER = "\n\n### Sentiment:"

# The three paraphrased questions (fixed: part of what a probe row means).
PARAPHRASES = {
    "question_feel": "How does the writer of this text feel?",
    "question_polarity": "Is the given text positive or negative?",
    "question_express": "What sentiment does this text express?",
}

def question_suffix(question: str) -> str:
    """The template text between the review and the label, with ``question`` as its question
    line; ``question_suffix(DEFAULT_QUESTION)`` is the paper's ``utils.task.SENTIMENT.suffix``."""
    return f"{QUESTION_HEADER}{question}{ANSWER_HEADER}"


# ---------------------------------------------------------------------------------------------
# text transforms: (text, names) -> text, changing the forgotten-name matches only
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _pattern(names: tuple[str, ...]) -> re.Pattern:
    return name_pattern(list(names))


def map_names(text: str, names, fn: Callable[[str], str]) -> str:
    """``text`` with every match of a forgotten name (as the forget split was built: case
    insensitive, whole words) replaced by ``fn(match)``; everything else untouched."""
    return _pattern(tuple(names)).sub(lambda m: fn(m.group(0)), text)


def case_word(name: str) -> str:
    """Lower case; a match already all lower case is upper-cased instead (so it always changes)."""
    return name.lower() if name != name.lower() else name.upper()


def typo_word(word: str) -> str:
    """One deterministic typo in a word of at least ``MIN_TYPO_LETTERS`` letters: swap the first
    pair of adjacent inner letters (neither the first nor the last character) that differ
    ("Allen" -> "Aleln", "Woody" -> "Wodoy"); a word whose inner letters are all the same drops
    its second character instead. Shorter words are returned unchanged."""
    if sum(c.isalpha() for c in word) < MIN_TYPO_LETTERS:
        return word
    for i in range(1, len(word) - 2):
        a, b = word[i], word[i + 1]
        if a != b and a.isalpha() and b.isalpha():
            return word[:i] + b + a + word[i + 2:]
    return word[0] + word[2:]


def typo_name(name: str) -> str:
    """The typo of ``typo_word`` in the last word of the name with at least
    ``MIN_TYPO_LETTERS`` letters; a name without such a word is left alone."""
    for m in reversed(list(re.finditer(r"\S+", name))):
        new = typo_word(m.group(0))
        if new != m.group(0):
            return name[: m.start()] + new + name[m.end():]
    return name


def surname_name(name: str) -> str:
    """The last word of a multi-word name (as written in the text); one-word names unchanged."""
    words = name.split()
    return words[-1] if len(words) > 1 else name


def name_case(text: str, names) -> str:
    return map_names(text, names, case_word)


def name_typo(text: str, names) -> str:
    return map_names(text, names, typo_name)


def name_surname(text: str, names) -> str:
    return map_names(text, names, surname_name)


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One input change: a question paraphrase, a text transform, or the prompt removal (at
    most one of them; none of them: the reference)."""
    description: str
    question: str | None = None  # template probe: the question line
    transform: Callable[[str, list[str]], str] | None = None  # name probe: (text, names) -> text
    remove_prompt: bool = False

    @property
    def kind(self) -> str:
        if self.question is not None:
            return "question"
        if self.transform is not None:
            return "names"
        return "prompt" if self.remove_prompt else "reference"


PROBES: dict[str, Probe] = {
    "none": Probe("the unprobed input (reference)"),
    **{name: Probe(f'the question line reads "{q}" instead of "{DEFAULT_QUESTION}"', question=q) for name, q in PARAPHRASES.items()},
    "name_case": Probe("every forgotten name in the texts lower-cased (upper-cased where it is already all lower case)",
                       transform=name_case),
    "name_typo": Probe(f"one typo in every forgotten name in the texts: in its last word of at least {MIN_TYPO_LETTERS} "
                       "letters, the first two adjacent inner letters that differ are swapped (Allen -> Aleln); "
                       "names without such a word are left alone", transform=name_typo),
    "name_surname": Probe("every multi-word forgotten name in the texts shortened to its last word (Woody Allen -> Allen); "
                          "one-word names unchanged", transform=name_surname),
    "no_prompt": Probe("the run's soft prompt removed (as inference_spul.py --no_prompt); n/a for runs without one",
                       remove_prompt=True),
}
NAME_PROBES = tuple(n for n, p in PROBES.items() if p.kind == "names")


def question_encoder(tokenizer, max_length: int, question: str | None = None):
    """An ``Encoder`` with ``question`` as its question line (None: the paper's). Its
    ``max_length`` is shifted by the change in question length, so every text keeps exactly
    the tokens it keeps under the paper's question: only the question tokens differ."""
    if question is None:
        return Encoder(tokenizer, max_length, task=SENTIMENT)
    suffix = question_suffix(question)

    def n(s):
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    return Encoder(tokenizer, max_length + n(suffix) - n(SENTIMENT.suffix), task=SENTIMENT, suffix=suffix)


def probe_splits(probe: Probe, splits: dict, names) -> tuple[dict, dict]:
    """(probed frames, texts changed per split) for a name probe; other probes change no text."""
    probed, changed = {}, {}
    for split, df in splits.items():
        if probe.transform is None:
            probed[split], changed[split] = df, 0
            continue
        texts = [probe.transform(t, names) for t in df["text"]]
        changed[split] = sum(a != b for a, b in zip(texts, df["text"]))
        out = df.copy()
        out["text"] = texts
        probed[split] = out
    return probed, changed


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0] + " Probes: " + "; ".join(f"{n}: {q.description}" for n, q in PROBES.items()) + ".")
    p.prog = "python -m utils.probes"
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by qlora.py, spul.py or baselines.py (each loaded once); "
                                                      "put them first, before flags that take several values")
    g = p.add_argument_group("probes")
    g.add_argument("--probes", nargs="+", choices=list(PROBES), default=list(PROBES), metavar="PROBE",
                   help=f"probes to run, of {', '.join(PROBES)} ('none', the reference, is always run)")
    g.add_argument("--forget_names", nargs="+", metavar="NAME", default=None,
                   help="the forgotten names the name probes re-spell (default: those recorded by an entities-recipe split folder, e.g. the embedded rt)")
    g.add_argument("--names", nargs="+", metavar="NAME", default=None,
                   help="row label of each RUN in probes.md, one per RUN in order (default: each run folder's name)")
    g.add_argument("--force", action="store_true", help="load a run whose manifest does not match the model or files it would be loaded with")
    cli.add_data_args(p)
    p.set_defaults(eval_splits=list(SPLITS))  # the four paper splits
    p.add_argument("--eval_batch_size", type=int, default=32, help="examples per forward")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", required=True, help="folder to write probes.json and probes.md into (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def check_args(args) -> list[str]:
    """Flag checks that need no data or model; returns the probes to run, in registry order."""
    cli.check_common(args)
    probes = [n for n in PROBES if n == "none" or n in args.probes]
    wants_names = any(n in NAME_PROBES for n in probes)
    if args.forget_names and not wants_names:
        raise cli.UsageError(f"--forget_names: only used by the name probes ({', '.join(NAME_PROBES)}), which --probes leaves out")
    if args.forget_names is not None and not any(n.strip() for n in args.forget_names):
        raise cli.UsageError("--forget_names: give at least one non-empty name")
    if args.names is not None:
        if len(args.names) != len(args.runs):
            raise cli.UsageError(f"--names: {len(args.names)} label(s) for {len(args.runs)} RUN(s); give one per RUN")
        if len(set(args.names)) != len(args.names):
            raise cli.UsageError("--names: the labels must differ")
    out = Path(args.output_path).resolve()
    for run in args.runs:
        r = Path(run).resolve()
        if out == r or out in r.parents:
            raise cli.UsageError(f"--output_path {args.output_path}: would replace the run folder {run}")

    check_output(Path(args.output_path), args.overwrite)
    return probes


def row_labels(args) -> list[str]:
    if args.names:
        return list(args.names)
    labels = [Path(r).resolve().name for r in args.runs]
    return labels if len(set(labels)) == len(labels) else [str(r) for r in args.runs]


def check_runs(args, probes) -> list[dict]:
    """Every RUN is a run folder of a loadable kind whose tokenizer holds every probe's template
    within --max_length; returns the manifests. Loads tokenizers only."""
    manifests = []
    for run in args.runs:
        manifest, tokenizer = read_run_tokenizer(run)
        manifests.append(manifest)
        for name in probes:
            cli.check_max_length(question_encoder(tokenizer, args.max_length, PROBES[name].question), SENTIMENT.all_words)
    return manifests


def resolve_names(args, probes) -> tuple[list[str] | None, str | None]:
    """The forgotten names and where they came from; None when no name probe runs."""
    if not any(n in NAME_PROBES for n in probes):
        return None, None
    if args.forget_names:
        return list(dict.fromkeys(n.strip() for n in args.forget_names if n.strip())), "--forget_names"

    names = names_from_split(locate(args.dataset, args.data_dir, args.data_root))
    if not names:
        asked = ", ".join(n for n in probes if n in NAME_PROBES)
        raise cli.UsageError(
            f"--probes {asked}: the name probes need the forgotten names, and the split folder does not record "
            f"them (not built by the entities recipe); pass them with --forget_names"
        )
    return names, "split manifest"


def evaluate_run(loaded, probes, splits, probed, changed, args, device) -> dict:
    """{probe: {"applicable", "metrics": {split: metrics}, "reused_from_none": [split, ...]}}."""
    names = [s for s in args.eval_splits if s in splits]
    tok, bs = loaded.tokenizer, args.eval_batch_size
    base = question_encoder(tok, args.max_length)
    guard = loaded.input_filter  # a filter run's filter sees every probed text
    none = evaluate_splits(loaded.model, base, splits, bs, device, prompt=loaded.prompt, split_names=names, input_filter=guard)
    results = {}
    for name in probes:
        probe = PROBES[name]
        if probe.kind == "reference":
            metrics, reused = none, []
        elif probe.kind == "question":
            enc = question_encoder(tok, args.max_length, probe.question)
            metrics = evaluate_splits(loaded.model, enc, splits, bs, device, prompt=loaded.prompt, split_names=names,
                                      input_filter=guard)
            reused = []
        elif probe.kind == "prompt":
            if loaded.prompt is None:
                results[name] = {"applicable": False, "metrics": None, "reused_from_none": []}
                continue
            metrics, reused = evaluate_splits(loaded.model, base, splits, bs, device, prompt=None, split_names=names), []
        else:
            todo = [s for s in names if changed[name][s] > 0]
            reused = [s for s in names if s not in todo]
            fresh = evaluate_splits(loaded.model, base, probed[name], bs, device, prompt=loaded.prompt, split_names=todo,
                                    input_filter=guard) if todo else {}
            metrics = {s: fresh[s] if s in fresh else none[s] for s in names}
        results[name] = {"applicable": True, "metrics": metrics, "reused_from_none": reused}
    return results


REUSED = "†"


def format_markdown(report: dict) -> str:
    """Rows = run x probe, columns = accuracy on each split; "n/a" where a probe does not apply."""
    splits = report["splits"]
    names_changed = report["changed_texts"]
    lines = ["# Robustness probes", "", "Accuracy (%) per split. " + REUSED + ": the probe changes no text of this split, "
             "so the `none` metrics are reused; n/a: the probe does not apply to the run.", "",
             "| run | probe | " + " | ".join(s.replace("_", " ") for s in splits) + " |",
             "|---|---" + "|---" * len(splits) + "|"]
    for run in report["runs"]:
        for name, res in run["results"].items():
            label = name
            if name in names_changed and not any(names_changed[name].values()):
                label += " (no text changed)"
            if not res["applicable"]:
                cells = ["n/a"] * len(splits)
            else:
                cells = [f"{res['metrics'][s]['accuracy']:.2f}" + (REUSED if s in res["reused_from_none"] else "") for s in splits]
            lines.append(f"| {run['name']} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Probes", ""]
    lines += [f"- `{p['name']}`: {p['description']}" for p in report["probes"]]
    if names_changed:
        lines += ["", f"Forgotten names ({report['names_source']}): " + ", ".join(report["forget_names"]), "",
                  "Texts changed by each name probe (changed / rows):", "",
                  "| probe | " + " | ".join(s.replace("_", " ") for s in splits) + " |",
                  "|---" + "|---" * len(splits) + "|"]
        rows = report["split_rows"]
        for name, counts in names_changed.items():
            lines.append(f"| {name} | " + " | ".join(f"{counts[s]}/{rows[s]}" for s in splits) + " |")
    return "\n".join(lines) + "\n"


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    probes = check_args(args)
    labels = row_labels(args)
    manifests = check_runs(args, probes)
    names, source = resolve_names(args, probes)



    seed_everything(args.seed)
    data = cli.data_config(args)
    if data.task is not SENTIMENT:
        raise cli.UsageError(f"--task {data.task.name}: the robustness probes paraphrase the sentiment task's question "
                             f"and names; they run on sentiment data only")
    splits = prepare_splits(data)
    split_names = [s for s in args.eval_splits if s in splits]
    splits = {s: splits[s] for s in split_names}
    probed, changed = {}, {}
    for name in probes:
        if PROBES[name].kind == "names":
            probed[name], changed[name] = probe_splits(PROBES[name], splits, names)
    if changed and not any(changed[n][s] for n in changed for s in split_names if s.endswith("forget")):
        print(f"warning: no forget text names any of {', '.join(names)}: the name probes change nothing", file=sys.stderr)

    device = select_device()
    runs = []
    for run, label, manifest in zip(args.runs, labels, manifests):
        loaded, forced = load_checked(run, device, args.force, flag="RUN")
        results = evaluate_run(loaded, probes, splits, probed, changed, args, device)
        runs.append({"name": label, "path": str(run), "kind": manifest.get("kind"), "has_prompt": loaded.prompt is not None,
                     "forced_mismatches": forced, "results": results})
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    report = {
        "probes": [{"name": n, "kind": PROBES[n].kind, "description": PROBES[n].description} for n in probes],
        "questions": {"default": DEFAULT_QUESTION, **{n: PROBES[n].question for n in probes if PROBES[n].question}},
        "forget_names": names, "names_source": source,
        "splits": split_names, "split_rows": {s: len(splits[s]) for s in split_names},
        "changed_texts": {n: {s: changed[n][s] for s in split_names} for n in changed},
        "runs": runs,
        "config": vars(args), "versions": library_versions(),
    }
    markdown = format_markdown(report)
    out = Path(args.output_path)
    if distributed.is_main():  # every process holds the gathered metrics; one writes them
        with atomic_run_dir(out, args.overwrite) as tmp:
            write_json(tmp / "probes.json", report)
            (tmp / "probes.md").write_text(markdown)
        print(markdown)
        print(f"probes: {out / 'probes.json'}")
    distributed.barrier()


if __name__ == "__main__":
    main()
