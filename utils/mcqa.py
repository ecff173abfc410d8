"""The paper's multiple-choice QA block (``--dataset wmdp_sciq``): forget = WMDP-bio questions,
retain = SciQ questions, four options A-D, the answer is the option letter (``utils.task.MCQA``).

Sources (notes §2): WMDP-bio is ``cais/wmdp`` config ``wmdp-bio``, split ``test`` (1,273
questions; ``question``, ``choices`` (4), ``answer`` (index)); SciQ is ``allenai/sciq``
(``question``, ``distractor1..3``, ``correct_answer``; train 11,679, validation 1,000, test
1,000). The four splits, with the paper's sizes:

- ``train_forget`` 900 / ``test_forget`` 373: a seeded random split of WMDP-bio (``SPLIT_SEED``),
  each side kept in WMDP's row order; WMDP's own option order is kept.
- ``train_retain`` 12,679: SciQ train then validation; ``test_retain`` 1,000: SciQ test.
  SciQ lists the right answer apart from three distractors, so its options are put in a seeded
  order (``OPTION_SEED``): within each of the two retain splits, a seeded permutation of
  ``row % 4`` gives each question the position of its right answer (so every letter is the
  answer of a quarter of the questions, within one), and a seeded permutation per question
  orders its distractors in the other three positions.

A split file (this module's output, or any folder passed with ``--data_dir``) has the columns
``question``, ``choices`` (a list of four options) and ``answer`` (the right option's index,
0-3, or its letter, A-D); ``utils.task.choices_frame`` reads it. Extra columns (here
``source`` and ``source_row``, the row's origin) are ignored.

The pure part (``wmdp_frame``, ``sciq_frame``, ``build_splits``) turns already-loaded tables
into the four split frames; ``fetch_sources`` loads the tables from the hub (``datasets``);
``ensure_wmdp_sciq`` builds the folder once into ``<cache>/data/wmdp_sciq`` with a manifest,
and reuses it while the manifest matches ``RECIPE`` and the files their recorded hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from utils.splits import MANIFEST, SPLIT_NAMES, SplitError, _move_into_place, sha256_file
from utils.task import MCQA

WMDP = {"hub_id": "cais/wmdp", "config": "wmdp-bio", "split": "test"}
SCIQ = {"hub_id": "allenai/sciq", "splits": ("train", "validation", "test")}
SIZES = {"train_retain": 12679, "train_forget": 900, "test_retain": 1000, "test_forget": 373}  # the paper's
LETTERS = MCQA.label_words  # A-D
SPLIT_SEED = 42  # WMDP-bio -> train_forget / test_forget
OPTION_SEED = 42  # SciQ's option order (own streams per split, independent of the split draw)
RECIPE = {"recipe": "wmdp_sciq", "version": 1, "split_seed": SPLIT_SEED, "option_seed": OPTION_SEED,
          "train_forget": SIZES["train_forget"]}
# What the forget set is about, for the instruction_prompt guardrail ("forget everything you
# know about the following subjects: ..."): WMDP-bio's questions are hazardous-biology
# knowledge (bioweapons, enhancing pathogens, reverse genetics, dual-use virology), while SciQ,
# the retain set, holds ordinary school biology, so the subjects name the hazardous part only.
NAMES = ["biosecurity threats and bioweapons", "enhancing pathogens for pandemic potential",
         "reverse genetics of viruses", "dual-use virology"]
CACHE_SUBDIR = ("data", "wmdp_sciq")
FILE_EXT = ".jsonl"  # keeps each row's list of choices as a list

_STREAM_FORGET, _STREAM_RETAIN = 0, 1  # rng streams: default_rng([seed, stream, ...])


def _frame(df: pd.DataFrame, where: str, columns) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SplitError(f"{where}: missing column(s) {', '.join(missing)} (need {','.join(columns)})")
    return df.reset_index(drop=True)


def wmdp_frame(table: pd.DataFrame, where: str = "cais/wmdp:wmdp-bio:test") -> pd.DataFrame:
    """WMDP rows as ``question, choices, answer`` (the hub's own option order and index)."""
    df = _frame(table, where, ("question", "choices", "answer"))
    choices = [list(c) for c in df["choices"]]
    for i, (c, a) in enumerate(zip(choices, df["answer"])):
        if len(c) != len(LETTERS):
            raise SplitError(f"{where}: row {i}: {len(c)} choices, expected {len(LETTERS)}")
        if not (isinstance(a, (int, np.integer)) and 0 <= a < len(LETTERS)):
            raise SplitError(f"{where}: row {i}: answer {a!r} is not an option index 0-{len(LETTERS) - 1}")
    return pd.DataFrame({"question": df["question"].astype(str), "choices": [[str(x) for x in c] for c in choices],
                         "answer": df["answer"].astype(int)})


def sciq_frame(table: pd.DataFrame, seed: int, stream: int, where: str = "allenai/sciq") -> pd.DataFrame:
    """SciQ rows as ``question, choices, answer``: the right answer at a seeded, balanced
    position (a permutation of ``row % 4``), the three distractors in a seeded order around it.
    ``stream`` separates the draws of the two retain splits."""
    df = _frame(table, where, ("question", "distractor1", "distractor2", "distractor3", "correct_answer"))
    n, k = len(df), len(LETTERS)
    rng = np.random.default_rng([seed, _STREAM_RETAIN, stream])
    answers = rng.permutation(np.arange(n) % k)
    orders = rng.permuted(np.tile(np.arange(k - 1), (n, 1)), axis=1)  # distractor order, one row per question
    distractors = df[["distractor1", "distractor2", "distractor3"]].astype(str).to_numpy()
    correct = df["correct_answer"].astype(str).to_numpy()
    choices = []
    for i in range(n):
        options = [distractors[i][j] for j in orders[i]]
        options.insert(int(answers[i]), correct[i])
        choices.append(options)
    return pd.DataFrame({"question": df["question"].astype(str), "choices": choices, "answer": answers.astype(int)})


def _tag(df: pd.DataFrame, sources, rows) -> pd.DataFrame:
    out = df.reset_index(drop=True)
    out["source"] = list(sources)
    out["source_row"] = np.asarray(rows, dtype=int)
    return out


def build_splits(wmdp: pd.DataFrame, sciq_train: pd.DataFrame, sciq_validation: pd.DataFrame, sciq_test: pd.DataFrame,
                 split_seed: int = SPLIT_SEED, option_seed: int = OPTION_SEED,
                 train_forget: int = SIZES["train_forget"]) -> dict[str, pd.DataFrame]:
    """The four splits (``question, choices, answer`` plus ``source``, the hub split a row
    comes from, and ``source_row``, its row there) from the loaded tables; pure and
    deterministic in the seeds."""
    wmdp_where = f"{WMDP['hub_id']}:{WMDP['config']}:{WMDP['split']}"
    forget = wmdp_frame(wmdp, wmdp_where)
    if not 0 < train_forget < len(forget):
        raise SplitError(f"{wmdp_where}: {len(forget)} questions cannot give {train_forget} train_forget rows "
                        "and a non-empty test_forget")
    order = np.random.default_rng([split_seed, _STREAM_FORGET]).permutation(len(forget))
    train_rows, test_rows = np.sort(order[:train_forget]), np.sort(order[train_forget:])
    sciq = SCIQ["hub_id"]
    pool = pd.concat([sciq_train, sciq_validation], ignore_index=True)
    pool_sources = [f"{sciq}:train"] * len(sciq_train) + [f"{sciq}:validation"] * len(sciq_validation)
    pool_rows = list(range(len(sciq_train))) + list(range(len(sciq_validation)))
    return {
        "train_retain": _tag(sciq_frame(pool, option_seed, 0, f"{sciq}:train+validation"), pool_sources, pool_rows),
        "train_forget": _tag(forget.iloc[train_rows], [wmdp_where] * len(train_rows), train_rows),
        "test_retain": _tag(sciq_frame(sciq_test, option_seed, 1, f"{sciq}:test"), [f"{sciq}:test"] * len(sciq_test),
                            range(len(sciq_test))),
        "test_forget": _tag(forget.iloc[test_rows], [wmdp_where] * len(test_rows), test_rows),
    }


# ---------------------------------------------------------------------------------------------
# The hub, and the cached split folder
# ---------------------------------------------------------------------------------------------


def fetch_sources() -> dict[str, pd.DataFrame]:
    """WMDP-bio and the three SciQ splits from the hub, as ``wmdp, sciq_train, sciq_validation,
    sciq_test`` tables; a one-line ``SplitError`` when the hub cannot be reached."""
    what = f"{WMDP['hub_id']} ({WMDP['config']})"
    try:
        import datasets

        wmdp = datasets.load_dataset(WMDP["hub_id"], WMDP["config"], split=WMDP["split"])
        what = SCIQ["hub_id"]
        sciq = datasets.load_dataset(SCIQ["hub_id"])
        return {"wmdp": wmdp.to_pandas(), **{f"sciq_{s}": sciq[s].to_pandas() for s in SCIQ["splits"]}}
    except Exception as e:
        raise SplitError(f"--dataset wmdp_sciq: cannot load {what} from the Hugging Face hub ({type(e).__name__}); "
                        "pass --data_dir FOLDER holding the four MCQA splits (question, choices, answer)") from e


def _rows_sha256(df: pd.DataFrame, columns) -> str:
    """A content hash of ``columns`` of every row (lists of options kept as lists)."""
    h = hashlib.sha256()
    for row in zip(*(df[c] for c in columns)):
        h.update(json.dumps([list(map(str, v)) if hasattr(v, "__len__") and not isinstance(v, str) else str(v)
                             for v in row], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def source_record(tables: dict[str, pd.DataFrame]) -> dict:
    """Where the rows came from, with a content hash of each table (its hub revision may move)."""
    sciq_cols = ("question", "distractor1", "distractor2", "distractor3", "correct_answer")
    return {
        "wmdp": {**WMDP, "rows": len(tables["wmdp"]),
                 "sha256": _rows_sha256(tables["wmdp"], ("question", "choices", "answer"))},
        "sciq": {"hub_id": SCIQ["hub_id"],
                 "rows": {s: len(tables[f"sciq_{s}"]) for s in SCIQ["splits"]},
                 "sha256": {s: _rows_sha256(tables[f"sciq_{s}"], sciq_cols) for s in SCIQ["splits"]}},
    }


def manifest_record(splits: dict[str, pd.DataFrame], sources: dict) -> dict:
    counts = {s: len(splits[s]) for s in SPLIT_NAMES}
    return {
        **RECIPE,
        "dataset": "wmdp_sciq",
        "task": "mcqa",
        "description": ("forget = WMDP-bio (train_forget / test_forget: a random split seeded by split_seed, "
                        "WMDP's option order); retain = SciQ (train_retain = train + validation, test_retain = "
                        "test; the right answer at a seeded, balanced position, the distractors in a seeded "
                        "order, seeded by option_seed); see utils/mcqa.py"),
        "names": list(NAMES),
        "sources": sources,
        "counts": counts,
        "paper_sizes": dict(SIZES),
        "matches_paper_sizes": counts == SIZES,
        "answer_letters": {s: {L: int((splits[s]["answer"] == i).sum()) for i, L in enumerate(LETTERS)} for s in SPLIT_NAMES},
    }


def _write_jsonl(df: pd.DataFrame, path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in df.to_dict(orient="records"):
            f.write(json.dumps({k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()},
                               ensure_ascii=False) + "\n")


def write_folder(splits: dict[str, pd.DataFrame], out_dir, record: dict) -> dict:
    """The four ``.jsonl`` splits and ``manifest.json`` (``record`` plus each file's sha256),
    built in a hidden sibling and moved into place, so a failure never leaves half a folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        hashes = {}
        for s in SPLIT_NAMES:
            path = tmp / f"{s}{FILE_EXT}"
            _write_jsonl(splits[s], path)
            hashes[path.name] = sha256_file(path)
        manifest = {**record, "sha256": hashes}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_current(out_dir) -> bool:
    """True when ``out_dir`` holds a folder built with ``RECIPE`` whose files are intact."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in RECIPE.items()):
        return False
    hashes = manifest.get("sha256") or {}
    return sorted(hashes) == sorted(f"{s}{FILE_EXT}" for s in SPLIT_NAMES) and all(
        (out_dir / name).is_file() and sha256_file(out_dir / name) == digest for name, digest in hashes.items())


def build_folder(out_dir, tables: dict[str, pd.DataFrame]) -> dict:
    """Build the four splits from loaded tables into ``out_dir``; return the manifest."""
    splits = build_splits(tables["wmdp"], tables["sciq_train"], tables["sciq_validation"], tables["sciq_test"])
    return write_folder(splits, out_dir, manifest_record(splits, source_record(tables)))


def ensure_wmdp_sciq(cache_root, fetch=fetch_sources) -> Path:
    """``<cache_root>/data/wmdp_sciq``, built from the hub (``fetch``) unless an intact folder
    made with ``RECIPE`` is already there."""
    out_dir = Path(cache_root).joinpath(*CACHE_SUBDIR)
    if is_current(out_dir):
        return out_dir
    tables = fetch()
    try:
        manifest = build_folder(out_dir, tables)
    except OSError:
        if not is_current(out_dir):  # a concurrent build that won the race is fine
            raise
        return out_dir
    if not manifest["matches_paper_sizes"]:
        print(f"warning: --dataset wmdp_sciq: split sizes {manifest['counts']} differ from the paper's {SIZES} "
              f"(the hub tables changed?); built anyway into {out_dir}", file=sys.stderr)
    return out_dir
