"""The multiple-choice QA track (``--dataset wmdp_sciq``, ``utils/mcqa.py``, ``utils.task.MCQA``):
the WMDP-bio + SciQ builder on fake hub tables, the MCQA folder format, letter parsing, the
table2 recipe's dry run, and one tiny end-to-end pass through every entry point."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from utils import mcqa
from utils.splits import SplitError
from utils.data import DATASETS, DataError, load_splits, locate, read_split_folder, resolve_task
from utils.task import MCQA, OTHER, letter_answer

REPO = Path(__file__).resolve().parents[1]
LETTERS = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------
# fake hub tables, the paper's sizes
# ---------------------------------------------------------------------------------------------


def fake_wmdp(n=1273):
    return pd.DataFrame({"question": [f"Which agent {i}?" for i in range(n)],
                         "choices": [[f"wmdp {i} option {j}" for j in range(4)] for i in range(n)],
                         "answer": [(i * 7) % 4 for i in range(n)]})


def fake_sciq(name, n):
    return pd.DataFrame({"question": [f"{name} question {i}?" for i in range(n)],
                         **{f"distractor{k}": [f"{name} {i} wrong {k}" for i in range(n)] for k in (1, 2, 3)},
                         "correct_answer": [f"{name} {i} right" for i in range(n)],
                         "support": [""] * n})


@pytest.fixture(scope="module")
def tables():
    return {"wmdp": fake_wmdp(), "sciq_train": fake_sciq("train", 11679),
            "sciq_validation": fake_sciq("validation", 1000), "sciq_test": fake_sciq("test", 1000)}


def build(tables, **kw):
    return mcqa.build_splits(tables["wmdp"], tables["sciq_train"], tables["sciq_validation"], tables["sciq_test"], **kw)


def records(splits):
    return {s: df.to_dict(orient="records") for s, df in splits.items()}


@pytest.fixture(scope="module")
def built(tables):
    return build(tables)


def test_builder_gives_the_papers_sizes_and_is_deterministic(tables, built):
    assert {s: len(df) for s, df in built.items()} == mcqa.SIZES == {
        "train_retain": 12679, "train_forget": 900, "test_retain": 1000, "test_forget": 373}
    assert records(build(tables)) == records(built)
    other = build(tables, split_seed=1, option_seed=1)
    assert other["train_forget"]["source_row"].tolist() != built["train_forget"]["source_row"].tolist()
    assert other["test_retain"]["answer"].tolist() != built["test_retain"]["answer"].tolist()
    for df in built.values():
        assert list(df.columns[:3]) == ["question", "choices", "answer"]


def test_train_and_test_are_disjoint_and_cover_the_sources(built):
    forget_train, forget_test = set(built["train_forget"]["source_row"]), set(built["test_forget"]["source_row"])
    assert not forget_train & forget_test and forget_train | forget_test == set(range(1273))
    assert set(built["train_retain"]["source"]) == {"allenai/sciq:train", "allenai/sciq:validation"}
    assert set(built["test_retain"]["source"]) == {"allenai/sciq:test"}
    questions = {s: set(df["question"]) for s, df in built.items()}
    assert not questions["train_forget"] & questions["test_forget"]
    assert not questions["train_retain"] & questions["test_retain"]
    assert not (questions["train_forget"] | questions["test_forget"]) & (questions["train_retain"] | questions["test_retain"])


def test_option_shuffle_keeps_the_right_answer_at_its_letter(tables, built):
    sources = {"allenai/sciq:train": tables["sciq_train"], "allenai/sciq:validation": tables["sciq_validation"],
               "allenai/sciq:test": tables["sciq_test"]}
    for split in ("train_retain", "test_retain"):
        for row in built[split].itertuples():
            src = sources[row.source].iloc[row.source_row]
            assert row.question == src["question"] and row.choices[row.answer] == src["correct_answer"]
            assert sorted(c for i, c in enumerate(row.choices) if i != row.answer) == sorted(
                src[f"distractor{k}"] for k in (1, 2, 3))
    for split in ("train_forget", "test_forget"):  # WMDP keeps its own order and index
        for row in built[split].itertuples():
            src = tables["wmdp"].iloc[row.source_row]
            assert row.choices == src["choices"] and row.answer == src["answer"]


def test_answer_letters_are_spread_over_a_to_d(built):
    for split in ("train_retain", "test_retain"):  # a balanced, seeded position per question
        counts = built[split]["answer"].value_counts().reindex(range(4), fill_value=0)
        assert counts.max() - counts.min() <= 1, (split, counts.tolist())
        first = built[split]["answer"].head(40).tolist()
        assert len(set(first)) == 4 and first != sorted(first)  # not in a cycle or blocks
    for split in ("train_forget", "test_forget"):
        assert set(built[split]["answer"]) == {0, 1, 2, 3}
    frame = MCQA.check_frame(built["test_retain"], "test_retain")
    assert sorted(set(frame["label_text"])) == list(LETTERS)
    assert frame["text"][0].split("\n")[1].startswith("A. ") and frame["text"][0].count("\n") == 4


# ---------------------------------------------------------------------------------------------
# the hub fetch and the cache folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tables, monkeypatch, tmp_path):
    """``datasets.load_dataset`` answering the two hub ids from the fake tables; calls counted."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if path == "cais/wmdp" and name == "wmdp-bio":
            ds = datasets.DatasetDict({"test": datasets.Dataset.from_pandas(tables["wmdp"])})
        elif path == "allenai/sciq" and name is None:
            ds = datasets.DatasetDict({s: datasets.Dataset.from_pandas(tables[f"sciq_{s}"])
                                       for s in ("train", "validation", "test")})
        else:
            raise FileNotFoundError(f"no dataset {path} {name}")
        return ds[split] if split else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("SPUL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPUL_DATA_ROOT", raising=False)
    return calls


def test_dataset_builds_once_into_the_cache_with_a_manifest(fake_hub, built, tmp_path):
    assert DATASETS["wmdp_sciq"].task == "mcqa" and resolve_task("wmdp_sciq") is MCQA
    splits = load_splits("wmdp_sciq")
    assert {s: len(df) for s, df in splits.items()} == mcqa.SIZES
    assert fake_hub == [("cais/wmdp", "wmdp-bio", "test"), ("allenai/sciq", None, None)]
    folder = locate("wmdp_sciq")
    assert folder == tmp_path / "cache" / "data" / "wmdp_sciq" and len(fake_hub) == 2  # reused, not fetched again
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"] == mcqa.SIZES and manifest["matches_paper_sizes"]
    assert (manifest["split_seed"], manifest["option_seed"]) == (mcqa.SPLIT_SEED, mcqa.OPTION_SEED)
    assert manifest["task"] == "mcqa" and manifest["names"] == mcqa.NAMES
    assert manifest["sources"]["wmdp"]["rows"] == 1273
    assert manifest["sources"]["sciq"]["rows"] == {"train": 11679, "validation": 1000, "test": 1000}
    assert MCQA.check_frame(built["test_forget"], "x").equals(splits["test_forget"])  # the folder reads back as built
    (folder / "test_forget.jsonl").write_text("{}\n")  # a damaged cache is rebuilt
    assert len(load_splits("wmdp_sciq")["test_forget"]) == 373 and len(fake_hub) == 4


def test_the_forgotten_subjects_are_found_for_the_instruction_guardrail(fake_hub):
    from utils.data import DataConfig
    from utils import guardrails
    from utils.augment import names_from_split, subjects_from_split
    from utils.task import MCQA

    assert subjects_from_split(locate("wmdp_sciq")) == mcqa.NAMES
    assert names_from_split(locate("wmdp_sciq")) is None  # not people's names (no name swaps, no name probes)
    data = DataConfig(dataset="wmdp_sciq", task=MCQA)
    guard = guardrails.instruction_guardrail(guardrails.GuardrailOptions(data=data), {}, MCQA)
    assert guard.record["forget_names"] == mcqa.NAMES and all(n in guard.text for n in mcqa.NAMES)


def test_hub_unreachable_is_one_line_naming_the_dataset_and_data_dir(monkeypatch, tmp_path):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("SPUL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPUL_DATA_ROOT", raising=False)
    with pytest.raises(SplitError) as e:  # the split builder's error (a user error: one line, exit 2)
        load_splits("wmdp_sciq")
    msg = str(e.value)
    assert "\n" not in msg and "--dataset wmdp_sciq" in msg and "--data_dir" in msg and "cais/wmdp" in msg
    assert not (tmp_path / "cache" / "data" / "wmdp_sciq").exists()


def test_rt_keeps_its_embedded_build():
    assert DATASETS["rt"].embedded and DATASETS["rt"].builder is None and DATASETS["rt"].task == "sentiment"


# ---------------------------------------------------------------------------------------------
# the MCQA folder format
# ---------------------------------------------------------------------------------------------

SPLITS = ("train_retain", "train_forget", "test_retain", "test_forget")


def mcqa_rows(split, n, letters=False):
    answers = [(i * 3 + len(split)) % 4 for i in range(n)]
    return pd.DataFrame({"question": [f"{split} question {i}: which one holds?" for i in range(n)],
                         "choices": [[f"option {j} of {i}" for j in range(4)] for i in range(n)],
                         "answer": [LETTERS[a] for a in answers] if letters else answers})


def write_mcqa(folder, n=8, ext="jsonl", letters=False, sizes=None, **frames):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        df = frames.get(split, mcqa_rows(split, (sizes or {}).get(split, n), letters))
        if ext == "csv":
            df = df.assign(choices=[json.dumps(list(c)) for c in df["choices"]])
            df.to_csv(folder / f"{split}.csv", index=False)
        else:
            df.to_json(folder / f"{split}.jsonl", orient="records", lines=True)
    return folder


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
@pytest.mark.parametrize("letters", [False, True])
def test_folder_reads_jsonl_and_csv_with_index_or_letter_answers(tmp_path, ext, letters):
    folder = write_mcqa(tmp_path / "d", ext=ext, letters=letters)
    splits = load_splits("wmdp_sciq", data_dir=str(folder))  # the task comes from --dataset
    expected = mcqa_rows("test_forget", 8)
    df = splits["test_forget"]
    assert df["label"].tolist() == expected["answer"].tolist()
    assert df["label_text"].tolist() == [LETTERS[a] for a in expected["answer"]]
    assert df["text"][1] == "test_forget question 1: which one holds?\nA. option 0 of 1\nB. option 1 of 1\nC. option 2 of 1\nD. option 3 of 1"
    direct = read_split_folder(folder, task=MCQA)
    assert set(direct) == set(splits) and all(splits[s].equals(df) for s, df in direct.items())


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
@pytest.mark.parametrize("answer, needle", [(4, "answer 4"), ("E", "answer 'E'"), (-1, "answer -1")])
def test_bad_answer_is_one_line_naming_the_file(tmp_path, ext, answer, needle):
    bad = mcqa_rows("test_forget", 8).astype({"answer": object})
    bad.loc[2, "answer"] = answer
    folder = write_mcqa(tmp_path / "d", ext=ext, test_forget=bad)
    with pytest.raises(DataError) as e:
        load_splits("wmdp_sciq", data_dir=str(folder))
    msg = str(e.value)
    assert "\n" not in msg and f"test_forget.{ext}" in msg and needle in msg


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_wrong_number_of_choices_is_one_line_naming_the_file(tmp_path, ext):
    bad = mcqa_rows("train_forget", 8)
    bad.at[3, "choices"] = ["only", "three", "options"]
    folder = write_mcqa(tmp_path / "d", ext=ext, train_forget=bad)
    with pytest.raises(DataError) as e:
        load_splits("wmdp_sciq", data_dir=str(folder))
    msg = str(e.value)
    assert "\n" not in msg and f"train_forget.{ext}" in msg and "row 3" in msg and "4 options" in msg


def test_csv_choices_that_are_not_a_list_are_refused(tmp_path):
    bad = mcqa_rows("train_retain", 8).assign(choices="option one; option two")
    folder = write_mcqa(tmp_path / "d", train_retain=bad)
    with pytest.raises(DataError, match=r"train_retain\.jsonl: row 0: 'choices' must be a list of 4 options"):
        load_splits("wmdp_sciq", data_dir=str(folder))


# ---------------------------------------------------------------------------------------------
# reading a generated answer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, index", [
    ("B", 1), (" (C) because the virus", 2), ("D.", 3), ("A", 0), ("Answer: D", 3),
    ("a cell", OTHER), ("unknown", OTHER), ("", OTHER), ("Because", OTHER), ("b", OTHER),
])
def test_letter_answer_and_parse(text, index):
    assert letter_answer(text, LETTERS) == index
    assert MCQA.parse(text) == index


def test_answer_index_falls_back_to_the_generic_labels():
    assert MCQA.answer_index(" (C) because") == 2
    assert MCQA.answer_index("unknown") == 4 and MCQA.answer_index(" none of them") == 5
    assert MCQA.answer_index("a cell") == OTHER


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------

ENTRY = {"inference_spul.py": "inference_spul", "qlora.py": "qlora", "spul.py": "spul",
         "baselines.py": "baselines", "utils.report": "utils.report"}


def dry_run(**env):
    out = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh"), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def parse(cmd):
    import importlib

    module_mode = cmd[1] == "-m"
    target = cmd[2] if module_mode else Path(cmd[1]).name
    rest = cmd[3:] if module_mode else cmd[2:]
    try:
        return target, importlib.import_module(ENTRY[target]).build_parser().parse_args(rest)
    except SystemExit:
        pytest.fail(f"{target} does not accept: {' '.join(rest)}")


@pytest.mark.parametrize("profile", ["paper", "cpu"])
def test_table2_dry_run_for_wmdp_sciq_parses(profile):
    parsed = [parse(c) for c in dry_run(DATASET="wmdp_sciq", PROFILE=profile, SEEDS="1")]
    assert parsed[-1][0] == "utils.report"
    stages = [a for t, a in parsed if t != "utils.report"]
    assert stages and all(a.dataset == "wmdp_sciq" and resolve_task(a.dataset, a.task) is MCQA for a in stages)
    assert all(a.output_path.startswith("runs/") and "wmdp_sciq" in a.output_path for a in stages)
    qlora_runs = [a for t, a in parsed if t == "qlora.py"]
    assert len(qlora_runs) == 2  # the QLoRA run and the retrain oracle
    if profile == "paper":  # notes §4: QLoRA 5 epochs on MCQA, max length 1024
        assert {a.num_epochs for a in qlora_runs} == {5} and {a.max_length for a in stages} == {1024}
    else:
        assert {a.max_length for a in stages} == {256}
    assert {a.unlearn_method for t, a in parsed if t == "baselines.py"} >= {"gradient_ascent_descent", "instruction_prompt"}


# ---------------------------------------------------------------------------------------------
# end to end on a tiny model (last: the slowest)
# ---------------------------------------------------------------------------------------------

E2E_SIZES = {"train_retain": 24, "train_forget": 8, "test_retain": 8, "test_forget": 8}
EVAL_SPLITS = ("train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget")
TRAIN = ["--num_epochs", "1", "--train_batch_size", "8"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_model_dir):
    import baselines
    import inference_spul
    import qlora
    import spul
    from utils import report

    root = tmp_path_factory.mktemp("mcqa_e2e")
    folder = write_mcqa(root / "data", sizes=E2E_SIZES, letters=True)
    data = ["--dataset", "wmdp_sciq", "--data_dir", str(folder), "--max_length", "96", "--eval_batch_size", "8"]
    qlora.main(["--model_name", tiny_model_dir, "--lr", "1e-3", "--no_quantize", "--output_path", str(root / "qlora")]
               + TRAIN + data)
    spul.main(["--model_checkpoints", str(root / "qlora"), "--lr", "1e-2", "--ptuning_num_tokens", "4",
               "--ptuning_hidden_size", "16", "--output_path", str(root / "spul")] + TRAIN + data)
    baselines.main(["--model_checkpoints", str(root / "qlora"), "--unlearn_method", "gradient_ascent_descent",
                    "--lr", "1e-3", "--output_path", str(root / "gradient_ascent_descent")] + TRAIN + data)
    baselines.main(["--model_checkpoints", str(root / "qlora"), "--unlearn_method", "instruction_prompt",
                    "--forget_names", *mcqa.NAMES, "--output_path", str(root / "instruction_prompt")] + data)
    inference_spul.main(["--model_checkpoints", str(root / "spul"), "--output_path", str(root / "eval_spul")] + data)
    inference_spul.main(["--model_checkpoints", str(root / "qlora"), "--protocol", "generate", "--max_new_tokens", "3",
                         "--output_path", str(root / "eval_generate")] + data)
    runs = ["qlora", "gradient_ascent_descent", "instruction_prompt", "spul", "eval_spul", "eval_generate"]
    assert report.main([str(root / r) for r in runs] + ["--markdown", str(root / "table.md"),
                                                        "--csv", str(root / "table.csv")]) == 0
    return root, runs


def read(path):
    return json.loads(Path(path).read_text())


def test_end_to_end_records_the_mcqa_task_and_scores_letters(e2e):
    root, runs = e2e
    for run in runs:
        manifest = read(root / run / "manifest.json")
        if manifest["kind"] == "eval":  # an evaluation records the run it evaluated
            assert manifest["evaluated"]["dataset"] == "wmdp_sciq"
            manifest = manifest["evaluated"]
        assert manifest["task"] == "mcqa" and manifest["template"] == MCQA.template, run
        assert manifest["label_words"] == list(LETTERS) and manifest["generic_labels"] == list(MCQA.generic_labels)
        metrics = read(root / run / "metrics.json")
        assert set(metrics) == set(EVAL_SPLITS), run
        for split, m in metrics.items():
            assert 0 <= m["accuracy"] <= 100 and 0 <= m["f1"] <= 100, (run, split)
            predictions = m["predictions"]
            assert set(LETTERS) <= set(predictions) and "positive" not in predictions, (run, split)
            assert sum(predictions.values()) == m["n"], (run, split)
    assert read(root / "spul" / "metrics.json") == read(root / "eval_spul" / "metrics.json")
    assert read(root / "qlora" / "manifest.json")["splits"]["train_forget"]["rows"] == 7  # one carved into val_forget
    guard = read(root / "instruction_prompt" / "manifest.json")
    assert guard["guardrail"]["forget_names"] == mcqa.NAMES and guard["guardrail"]["instruction"] == MCQA.instruction
    table = (root / "table.md").read_text()
    assert table.count("\n") >= len(runs) + 1


def test_a_too_long_question_loses_its_head_never_its_options():
    from tests.tiny import tiny_tokenizer
    from utils.task import MCQA, format_question
    from utils.template import Encoder

    tok = tiny_tokenizer()
    text = format_question("why " * 60 + "is the sky blue?", ["air", "sea", "ice", "sun"], MCQA.label_words)
    full = Encoder(tok, 4096, task=MCQA).encode(text, "B")[0]
    enc = Encoder(tok, 120, task=MCQA)
    ids, label = enc.encode(text, "B")
    assert len(ids) <= 120 and ids[-len(label):] == label
    assert ids[-60:] == full[-60:]  # the options, the answer header and the label: the end of the string is kept
    decoded = tok.decode(ids)
    assert all(f"{letter}. {word}" in decoded.replace(" . ", ". ") or f"{letter} . {word}" in decoded
               for letter, word in zip("ABCD", ["air", "sea", "ice", "sun"]))
    assert decoded.count("why") < 60  # the head of the question went
    # the sentiment task still cuts the tail of its text
    from utils.task import SENTIMENT

    review = "good " * 200
    s_ids, _ = Encoder(tok, 60, task=SENTIMENT).encode(review, "positive")
    s_full, _ = Encoder(tok, 4096, task=SENTIMENT).encode(review, "positive")
    assert s_ids[:12] == s_full[:12]


def test_a_run_of_one_task_is_not_evaluated_as_another(tmp_path, capsys):
    import inference_spul

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"kind": "qlora", "task": "sentiment"}))
    folder = write_mcqa(tmp_path / "mcqa")
    with pytest.raises(SystemExit) as e:
        inference_spul.main(["--model_checkpoints", str(run), "--dataset", "wmdp_sciq", "--data_dir", str(folder),
                             "--output_path", str(tmp_path / "eval")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sentiment task" in err[0] and "mcqa" in err[0]
    assert not (tmp_path / "eval").exists()
