"""Every recipe in scripts/ is checked against the code it calls: its dry run prints each
command, and each command must parse with that entry point's own parser."""
import importlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["table2.sh", "table3.sh", "table4.sh", "table5.sh", "fig2.sh", "spul_long.sh", "spul_prefix.sh"]
ENTRY = {"inference_spul.py": "inference_spul", "qlora.py": "qlora", "spul.py": "spul",
         "baselines.py": "baselines", "utils.report": "utils.report", "utils.select": "utils.select",
         "utils.relearn": "utils.relearn", "utils.probes": "utils.probes"}


def dry_run(script, **env):
    out = subprocess.run(["bash", str(REPO / "scripts" / script), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def parse(cmd):
    target = cmd[2] if cmd[1] == "-m" else Path(cmd[1]).name
    rest = cmd[3:] if cmd[1] == "-m" else cmd[2:]
    module = importlib.import_module(ENTRY[target])
    try:
        return target, module.build_parser().parse_args(rest)
    except SystemExit:
        pytest.fail(f"{target} does not accept: {' '.join(rest)}")


@pytest.mark.parametrize("profile", ["paper", "cpu"])
@pytest.mark.parametrize("script", RECIPES)
def test_every_emitted_command_parses(script, profile):
    cmds = dry_run(script, PROFILE=profile, SEEDS="1 2")
    assert cmds, "the dry run printed nothing"
    targets = [parse(c)[0] for c in cmds]
    assert targets[-1] == "utils.report" and "qlora.py" in targets


def test_table2_runs_every_method_and_seed():
    cmds = dry_run("table2.sh", PROFILE="cpu", SEEDS="7 8")
    parsed = [parse(c) for c in cmds]
    methods = {a.unlearn_method for t, a in parsed if t == "baselines.py"}
    assert methods == {"gradient_ascent", "random_label", "random_label_descent", "gradient_ascent_kl",
                       "gradient_ascent_descent", "npo", "instruction_prompt", "in_context", "name_filter"}
    assert {a.seed for t, a in parsed if t != "utils.report"} == {7, 8}
    protocols = [a.protocol for t, a in parsed if t == "inference_spul.py"]
    assert sorted(protocols) == ["argmax", "generate"]  # the Vanilla row under both, once: no training seed
    assert all(a.max_val_retain == 128 and a.max_val_forget == 64 for t, a in parsed if t != "utils.report")
    spul = [a for t, a in parsed if t == "spul.py"]
    assert len(spul) == 2 and all(a.model_checkpoints.endswith(f"qlora-s{a.seed}") for a in spul)
    oracles = [a for t, a in parsed if t == "qlora.py" and a.retain_only]
    assert sorted(a.seed for a in oracles) == [7, 8] and all(a.output_path.endswith(f"retrain-s{a.seed}") for a in oracles)
    qloras = [a for t, a in parsed if t == "qlora.py" and not a.retain_only]
    assert [(a.lr, a.num_epochs, a.train_batch_size) for a in oracles] == [(a.lr, a.num_epochs, a.train_batch_size) for a in qloras]
    report = parsed[-1][1]
    assert sum(r.endswith("retrain-s7") for r in report.runs) == 1 and report.mia_plot
    assert report.spread.endswith("table2-spread.md")  # two seeds: the seed spread too
    assert report.paired == "qlora" and report.paired_markdown.endswith("table2-paired.md")  # and differences to QLoRA
    one_seed = parse(dry_run("table2.sh", PROFILE="cpu", SEEDS="7")[-1])[1]
    assert one_seed.markdown.endswith("table2.md") and one_seed.spread is None and one_seed.paired is None
    no_qlora = parse(dry_run("table4.sh", PROFILE="cpu", SEEDS="7 8")[-1])[1]  # the forget-size sweep lists no QLoRA row
    assert no_qlora.spread and no_qlora.paired is None


def test_audit_attacks_spul_the_chosen_baseline_and_the_oracle():
    cmds = dry_run("audit.sh", AUDIT_BASELINE="runs/main/npo-s42")
    parsed = [parse(c) for c in cmds]
    assert [t for t, _ in parsed] == ["utils.relearn", "utils.relearn", "utils.probes"]
    relearn, control, probes = (a for _, a in parsed)
    assert relearn.runs == ["runs/main/spul-s42", "runs/main/npo-s42", "runs/main/retrain-s42"]
    assert relearn.steps == [10, 25, 50] and relearn.lr == 1e-3 and relearn.max_test_retain == 128
    assert relearn.attack_data == "forget" and control.attack_data == "retain"  # the control: the same attack otherwise
    assert {k: v for k, v in vars(control).items() if k not in ("attack_data", "output_path")} == \
        {k: v for k, v in vars(relearn).items() if k not in ("attack_data", "output_path")}
    assert control.output_path != relearn.output_path
    assert probes.runs == ["runs/main/spul-s42", "runs/main/npo-s42"]


def test_spul_long_reuses_the_main_job():
    parsed = [parse(c) for c in dry_run("spul_long.sh", PROFILE="", OUT="")]
    q = next(a for t, a in parsed if t == "qlora.py")
    s = next(a for t, a in parsed if t == "spul.py")
    assert q.output_path == "runs/main/qlora-s42" and s.model_checkpoints == q.output_path
    assert (s.num_epochs, s.lr, s.group_by_length, s.train_batch_size, s.cache_reference) == (20, 5e-3, 4, 8, True)
    assert parsed[-1][0] == "utils.report" and len(parsed) == 5  # vanilla (two protocols), qlora, spul, report
    assert s.counterfactual_retain == 0.25
    flagged = [parse(c) for c in dry_run("spul_long.sh", LONG_FLAGS="--counterfactual_retain 0.5")]
    assert next(a for t, a in flagged if t == "spul.py").counterfactual_retain == 0.5


def test_spul_prefix_is_the_selected_recipe_with_the_names_in_front_one_generic_label_and_16_epochs():
    parsed = [parse(c) for c in dry_run("spul_prefix.sh", PROFILE="", OUT="", SEEDS="42 1 2")]
    spuls = [a for t, a in parsed if t == "spul.py"]
    assert [a.seed for a in spuls] == [42, 1, 2]
    s = spuls[0]
    assert s.model_checkpoints == "runs/main/qlora-s42" and s.output_path == "runs/main/spul-prefix-s42"
    assert (s.hard_prefix, s.generic_label, s.num_epochs, s.lr, s.alpha, s.beta) == ("instruction", "unknown", 16, 3e-3, 1.0, 2.0)
    assert (s.stratify_batches, s.counterfactual_retain, s.train_batch_size, s.ptuning_num_tokens) == (True, 0.5, 8, 30)
    assert parsed[-1][0] == "utils.report"


def test_sweeps_cover_the_paper_grids():
    grid = {(a.alpha, a.beta) for t, a in map(parse, dry_run("table3.sh")) if t == "spul.py"}
    assert grid == {(x, y) for x in (0.1, 0.5, 1.0) for y in (0.0, 0.1, 0.5, 1.0)}
    taus = {a.forget_size for t, a in map(parse, dry_run("table4.sh")) if t == "spul.py"}
    assert taus == {0.25, 0.5, 1.0}
    ps = {a.ptuning_num_tokens for t, a in map(parse, dry_run("fig2.sh")) if t == "spul.py"}
    assert ps == {10, 20, 30, 40, 50}


def test_paper_profile_defaults():
    parsed = [parse(c) for c in dry_run("table2.sh")]
    q = next(a for t, a in parsed if t == "qlora.py")
    assert (q.model_name, q.dataset, q.num_epochs, q.lr, q.train_batch_size) == ("meta-llama/Llama-2-7b-hf", "sst2", 10, 1e-4, 32)
    s = next(a for t, a in parsed if t == "spul.py")
    assert (s.alpha, s.beta, s.ptuning_num_tokens, s.num_epochs, s.lr) == (1.0, 0.5, 30, 10, 1e-4)


def test_bad_profile_fails_clearly():
    out = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh"), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "PROFILE": "nope"}, cwd=REPO)
    assert out.returncode == 2 and "PROFILE=nope" in out.stderr


def test_setup_without_the_disk_for_the_venv_stops_in_one_line_before_pip(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text((REPO / "scripts" / "setup.sh").read_text())
    for name in ("requirements.txt", "requirements-data.txt"):
        (tmp_path / name).write_text((REPO / name).read_text())
    out = subprocess.run(["bash", "scripts/setup.sh"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={**os.environ, "SPUL_SETUP_MIN_FREE_MB": str(10 ** 12)})
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "MB free" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_reuses_finished_stage_and_stops_at_first_failure(tmp_path):
    out = tmp_path / "out"
    for done in ("vanilla-s42", "vanilla-generate-s42"):
        (out / done).mkdir(parents=True)
        (out / done / "metrics.json").write_text("{}")
    # PY=false: every stage that actually runs fails
    res = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh")], capture_output=True, text=True,
                         env={**os.environ, "PY": "false", "OUT": str(out), "PROFILE": "cpu"}, cwd=REPO, timeout=60)
    assert res.returncode == 1
    assert "[vanilla s42] reusing" in res.stdout
    assert "stage 'qlora s42' failed" in res.stderr
    assert "gradient_ascent" not in res.stdout  # nothing after the failed stage ran


def test_table2_reads_the_selected_settings_and_the_environment_wins(tmp_path):
    sel = tmp_path / "sel.env"
    sel.write_text("SEL_SPUL='--lr 0.003 --num_epochs 8 --alpha 1 --beta 2'\nSEL_NPO='--lr 1e-05 --num_epochs 1'\n")
    parsed = [parse(c) for c in dry_run("table2.sh", PROFILE="cpu", SELECTED=str(sel))]
    s = next(a for t, a in parsed if t == "spul.py")
    assert (s.lr, s.num_epochs, s.alpha, s.beta) == (3e-3, 8, 1.0, 2.0)
    npo = next(a for t, a in parsed if t == "baselines.py" and a.unlearn_method == "npo")
    ga = next(a for t, a in parsed if t == "baselines.py" and a.unlearn_method == "gradient_ascent")
    assert npo.lr == 1e-5 and ga.lr == 5e-5  # a method without a selection keeps the profile's lr
    parsed = [parse(c) for c in dry_run("table2.sh", PROFILE="cpu", SELECTED=str(sel), BETA="0.1", BASELINE_LR="2e-6")]
    s = next(a for t, a in parsed if t == "spul.py")
    assert (s.lr, s.beta) == (3e-3, 0.1)
    assert {a.lr for t, a in parsed if t == "baselines.py"} == {2e-6}


def grid_spul(grid):
    return [a for a in grid if not hasattr(a, "unlearn_method")]


def test_select_never_evaluates_test_and_sweeps_the_stated_grid():
    parsed = [parse(c) for c in dry_run("select.sh", PROFILE="cpu", SEEDS="5")]
    assert parsed[0][0] == "qlora.py" and parsed[-1][0] == "utils.select"
    grid = [a for t, a in parsed if t in ("spul.py", "baselines.py")]
    assert grid and all(not {"test_retain", "test_forget"} & set(a.eval_splits) for a in grid)
    assert {"val_retain", "val_forget", "train_forget"} <= set(grid[0].eval_splits)
    lrs = {(a.unlearn_method, a.lr) for a in grid if hasattr(a, "unlearn_method")}
    assert {lr for _, lr in lrs} >= {1e-6, 1e-5, 1e-4}
    assert {m for m, _ in lrs} == {"gradient_ascent", "random_label", "random_label_descent", "gradient_ascent_kl",
                                   "gradient_ascent_descent", "npo"}
    # RL+GD sweeps 1 and 4 epochs, and lr 1e-4 at 8 without and with the rest of SPUL's recipe (KL, pseudo-labelled
    # retain reviews, weight average), on SPUL's selected data flags; the others 1 epoch on their own data
    rlgd = [a for a in grid if getattr(a, "unlearn_method", None) == "random_label_descent"]
    assert sorted({a.num_epochs for a in rlgd}) == [1, 4, 8] and len(rlgd) == 2 * len({lr for m, lr in lrs if m == "random_label_descent"}) + 5
    assert [(a.lr, a.num_epochs) for a in rlgd if a.num_epochs == 8] == [(1e-4, 8), (1e-4, 8), (3e-5, 8)]
    whole = [(a.lr, a.num_epochs) for a in rlgd if (a.kl_weight, a.pseudo_retain, a.ema_decay) == (2.0, 128, 0.99)]
    assert whole == [(1e-4, 8), (3e-5, 8), (1e-4, 4)]  # the rest of SPUL's recipe, on three settings
    assert [(a.lr, a.num_epochs, a.pseudo_retain) for a in rlgd if a.kl_weight == 8.0] == [(1e-4, 4, 128)]  # and a stronger KL
    assert sum(a.kl_weight is None and a.pseudo_retain == 0 and a.ema_decay == 0 for a in rlgd) == len(rlgd) - 4
    assert all(a.counterfactual_retain == 0.5 and a.generic_label == "unknown" and a.stratify_batches for a in rlgd)
    assert len({a.output_path for a in rlgd}) == len(rlgd)
    others = [a for a in grid if hasattr(a, "unlearn_method") and a.unlearn_method != "random_label_descent"]
    assert all(a.num_epochs == 1 and a.counterfactual_retain == 0 and a.generic_label is None for a in others)
    select = parsed[-1][1]
    assert [r[-8:] for r in select.reference] == ["qlora-s5"] and len(select.runs) == len(grid)
    assert not select.update  # the whole selection rewrites the env file
    only_spul = [parse(c) for c in dry_run("select.sh", PROFILE="cpu", SEEDS="5", SELECT_METHODS="spul")]
    assert {t for t, _ in only_spul} == {"qlora.py", "spul.py", "utils.select"}
    assert only_spul[-1][1].update  # one method's grid keeps the other methods' lines
    two = [parse(c) for c in dry_run("select.sh", PROFILE="cpu", SELECT_SEEDS="1 2", SELECT_METHODS="spul")]
    spuls = [a for t, a in two if t == "spul.py"]
    assert sorted({a.seed for a in spuls}) == [1, 2] and len(spuls) == 2 * len(grid_spul(grid))
    assert all(a.model_checkpoints.endswith(f"qlora-s{a.seed}") for a in spuls)
    assert [r.rsplit("-", 1)[1] for r in two[-1][1].reference] == ["s1", "s2"]  # one reference per seed
    assert two[-1][1].over_seeds == "mean"
    worst = [parse(c) for c in dry_run("select.sh", PROFILE="cpu", SELECT_SEEDS="1 2", SELECT_METHODS="spul",
                                       SELECT_OVER_SEEDS="worst")]
    assert worst[-1][1].over_seeds == "worst"
    bad = subprocess.run(["bash", str(REPO / "scripts" / "select.sh"), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "PROFILE": "cpu", "SELECT_OVER_SEEDS": "median"}, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and not bad.stdout  # refused before any stage is planned
    assert bad.stderr.strip().splitlines() == ["error: SELECT_OVER_SEEDS=median: use one of mean,worst"]


def test_table2_evaluates_the_selected_run_of_the_selection_seed(tmp_path):
    sel = tmp_path / "sel.env"
    sel.write_text("SEL_SEED=7\nSEL_SPUL='--lr 0.003'\nSELRUN_SPUL=runs/x/select/spul-a-s7\n"
                   "SEL_NPO='--lr 1e-05'\nSELRUN_NPO=runs/x/select/npo-b-s7\n")
    parsed = [parse(c) for c in dry_run("table2.sh", PROFILE="cpu", SEEDS="7 8", SELECTED=str(sel), SPUL_RESTARTS="0")]
    evals = {a.model_checkpoints: a for t, a in parsed if t == "inference_spul.py" and a.model_checkpoints}
    assert set(evals) == {"runs/x/select/spul-a-s7", "runs/x/select/npo-b-s7"}  # seed 7: evaluated, not retrained
    assert all(a.seed == 7 and a.eval_splits[-2:] == ["test_retain", "test_forget"] for a in evals.values())
    spul = [a for t, a in parsed if t == "spul.py"]
    assert [a.seed for a in spul] == [8] and spul[0].lr == 3e-3  # seed 8 trains with the selected flags
    assert [a.seed for t, a in parsed if t == "baselines.py" and a.unlearn_method == "npo"] == [8]
    # a setting from the environment overrides the selection: nothing is reused
    parsed = [parse(c) for c in dry_run("table2.sh", PROFILE="cpu", SEEDS="7", SELECTED=str(sel), BETA="1", SPUL_RESTARTS="0")]
    assert [a.seed for t, a in parsed if t == "spul.py"] == [7]


def test_table2_guards_spul_on_the_cpu_profile_only(tmp_path):
    """PROFILE=cpu: table2.sh's SPUL stage carries spul.py's validation guard (--restarts 1
    --restart_val_forget 15), and the selection's SPUL run is trained again under it rather than
    reused (the guard may have to restart it); the baselines' selected runs are still reused.
    SPUL_RESTARTS=0 and the paper profile: no guard."""
    sel = tmp_path / "sel.env"
    sel.write_text("SEL_SEED=7\nSEL_SPUL='--lr 0.003'\nSELRUN_SPUL=runs/x/select/spul-a-s7\n"
                   "SEL_NPO='--lr 1e-05'\nSELRUN_NPO=runs/x/select/npo-b-s7\n")
    parsed = [parse(c) for c in dry_run("table2.sh", PROFILE="cpu", SEEDS="7", SELECTED=str(sel))]
    spul = [a for t, a in parsed if t == "spul.py"]
    assert [(a.seed, a.restarts, a.restart_val_forget) for a in spul] == [(7, 1, 15.0)]
    assert {a.model_checkpoints for t, a in parsed if t == "inference_spul.py" and a.model_checkpoints} == {"runs/x/select/npo-b-s7"}
    other = [parse(c) for c in dry_run("table2.sh", PROFILE="cpu", SEEDS="8", SPUL_RESTART_VAL_FORGET="10")]
    assert [(a.restarts, a.restart_val_forget) for t, a in other if t == "spul.py"] == [(1, 10.0)]
    for env in ({"PROFILE": "cpu", "SPUL_RESTARTS": "0"}, {"PROFILE": "paper"}):
        assert [a.restarts for t, a in (parse(c) for c in dry_run("table2.sh", SEEDS="8", **env)) if t == "spul.py"] == [0]
    for name, value, why in (("SPUL_RESTARTS", "-1", "use a whole number >= 0"),
                             ("SPUL_RESTART_VAL_FORGET", "101", "use an ACC in [0, 100]"),
                             ("SPUL_RESTART_VAL_FORGET", "ten", "use an ACC in [0, 100]")):
        bad = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh"), "--dry-run"], capture_output=True, text=True,
                             env={**os.environ, "PROFILE": "cpu", name: value}, cwd=REPO, timeout=60)
        assert bad.returncode == 2 and not bad.stdout  # refused before any stage is planned
        assert bad.stderr.strip().splitlines() == [f"error: {name}={value}: {why}"]


def test_table2_draws_the_in_context_baseline_on_the_cpu_profile_only():
    """PROFILE=cpu: the in-context baseline keeps the best of ICL_DRAWS=4 draws (baselines.py
    --icl_draws); ICL_DRAWS=1 and the paper profile draw once; a bad value stops in one line."""
    def draws(**env):
        parsed = [parse(c) for c in dry_run("table2.sh", SEEDS="7", **env)]
        return [a.icl_draws for t, a in parsed if t == "baselines.py" and a.unlearn_method == "in_context"]

    assert draws(PROFILE="cpu") == [4] and draws(PROFILE="cpu", ICL_DRAWS="6") == [6]
    assert draws(PROFILE="cpu", ICL_DRAWS="1") == [None] and draws(PROFILE="paper") == [None]
    for value in ("0", "-2", "four"):
        bad = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh"), "--dry-run"], capture_output=True, text=True,
                             env={**os.environ, "PROFILE": "cpu", "ICL_DRAWS": value}, cwd=REPO, timeout=60)
        assert bad.returncode == 2 and not bad.stdout
        assert bad.stderr.strip().splitlines() == [f"error: ICL_DRAWS={value}: use a whole number >= 1"]


def test_a_finished_stage_is_reused_only_by_the_command_that_made_it(tmp_path):
    out = tmp_path / "out"
    first = " ".join(dry_run("table2.sh", PROFILE="cpu", OUT=str(out), PY="false")[0])  # the vanilla s42 stage
    (out / "vanilla-s42").mkdir(parents=True)
    (out / "vanilla-s42" / "metrics.json").write_text("{}")
    record = out / ".vanilla-s42.cmd"
    env = {**os.environ, "PY": "false", "OUT": str(out), "PROFILE": "cpu"}

    def table2(**extra):
        return subprocess.run(["bash", str(REPO / "scripts" / "table2.sh")], capture_output=True, text=True,
                              env={**env, **extra}, cwd=REPO, timeout=60)

    record.write_text(first + "\n")  # the same command: reused, the next stage runs (and fails: PY=false)
    res = table2()
    assert "[vanilla s42] reusing" in res.stdout and "stage 'vanilla-generate s42' failed" in res.stderr
    res = table2(THREADS="3")  # another thread count: another command
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"stage 'vanilla s42': {out / 'vanilla-s42'} was made by another command (recorded in {record})" in res.stderr
    assert "reusing" not in res.stdout and "vanilla-generate" not in res.stdout + res.stderr  # nothing ran
    record.unlink()  # a folder without a record (made before the records): reused
    assert "[vanilla s42] reusing" in table2(THREADS="3").stdout


def test_a_stage_that_finishes_records_its_command(tmp_path):
    out = tmp_path / "out"
    fake = tmp_path / "fakepy"  # a stand-in interpreter that writes the run folder it is asked for
    fake.write_text('#!/usr/bin/env bash\nfor a; do [ "$prev" = --output_path ] && mkdir -p "$a" && echo "{}" > "$a/metrics.json"; prev=$a; done\n')
    fake.chmod(0o755)
    cmds = [" ".join(c) for c in dry_run("table2.sh", PROFILE="cpu", OUT=str(out), PY=str(fake))]
    res = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh")], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PY": str(fake), "OUT": str(out), "PROFILE": "cpu"})
    assert (out / ".vanilla-s42.cmd").read_text() == cmds[0] + "\n"
    assert (out / ".qlora-s42.cmd").read_text() == next(c for c in cmds if "qlora.py" in c and "--retain_only" not in c) + "\n"
