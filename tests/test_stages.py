"""utils.stages (ONE_PROCESS=1): a recipe's stages in one process write the same run folders as
the same commands run as separate processes; the plan written by scripts/common.sh round-trips;
a failing stage stops the plan with common.sh's message."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import stages

REPO = Path(__file__).resolve().parents[1]


def _plan_from_bash(tmp_path, *records):
    """The plan file that common.sh's plan_stage writes for ``records`` (each NAME DIR CMD...)."""
    calls = "\n".join("plan_stage " + " ".join(f"'{a}'" for a in rec) for rec in records)
    script = f'source scripts/common.sh\n{calls}\ncp "$PLAN" {tmp_path}/plan\n: > "$PLAN"\n'
    res = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PROFILE": "cpu", "ONE_PROCESS": "1", "PY": "false"})
    assert res.returncode == 0, res.stderr
    return tmp_path / "plan"


def test_plan_written_by_common_sh_round_trips(tmp_path):
    plan = _plan_from_bash(tmp_path, ("qlora s1", "runs/x/qlora-s1", ".venv/bin/python", "qlora.py", "--seed", "1", "--forget_names", "Ann Lee", ""),
                           ("report", "runs/x/r.json", "python", "-m", "utils.report", "runs/x/qlora-s1"))
    got = stages.read_plan(plan)
    assert got == [stages.Stage("qlora s1", "runs/x/qlora-s1", (".venv/bin/python", "qlora.py", "--seed", "1", "--forget_names", "Ann Lee", "")),
                   stages.Stage("report", "runs/x/r.json", ("python", "-m", "utils.report", "runs/x/qlora-s1"))]
    assert got[0].target() == ("qlora", ["--seed", "1", "--forget_names", "Ann Lee", ""])
    assert got[1].target() == ("utils.report", ["runs/x/qlora-s1"])


def test_a_command_that_is_not_an_entry_point_is_refused_before_any_stage_runs(tmp_path, capsys):
    plan = _plan_from_bash(tmp_path, ("ok", str(tmp_path / "a"), "python", "inference_spul.py", "--help"),
                           ("bad", str(tmp_path / "b"), "python", "somewhere/else.py"))
    assert stages.main([str(plan)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage 'bad': cannot run" in err


def test_a_failing_stage_stops_the_plan(tmp_path, capsys):
    bad = ("first", str(tmp_path / "first"), "python", "spul.py", "--alpha", "-1", "--output_path", str(tmp_path / "first"))
    never = ("second", str(tmp_path / "second"), "python", "inference_spul.py", "--output_path", str(tmp_path / "second"))
    assert stages.main([str(_plan_from_bash(tmp_path, bad, never))]) == 1
    out, err = capsys.readouterr()
    assert "error: --alpha -1.0: must be >= 0" in err and "stage 'first' failed (command above); later stages not run" in err
    assert "[second]" not in out and not (tmp_path / "second").exists()


def test_one_process_writes_the_same_run_folders_as_separate_processes(tmp_path, tiny_model_dir, tiny_data_args):
    def commands(out):
        common = [*tiny_data_args, "--threads", "1", "--seed", "3"]
        return [
            ("qlora", str(out / "qlora"), sys.executable, "qlora.py", "--model_name", tiny_model_dir, *common, "--num_epochs", "1",
             "--train_batch_size", "8", "--no_quantize", "--output_path", str(out / "qlora")),
            ("spul", str(out / "spul"), sys.executable, "spul.py", "--model_checkpoints", str(out / "qlora"), *common, "--num_epochs", "2",
             "--train_batch_size", "8", "--lr", "1e-2", "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "16", "--output_path", str(out / "spul")),
            ("eval", str(out / "eval"), sys.executable, "inference_spul.py", "--model_checkpoints", str(out / "spul"), *common,
             "--output_path", str(out / "eval")),
        ]

    apart, together = tmp_path / "apart", tmp_path / "together"
    for name, _, *argv in commands(apart):
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (name, res.stderr[-2000:])
    assert stages.main([str(_plan_from_bash(tmp_path, *commands(together)))]) == 0
    for run in ("qlora", "spul", "eval"):
        a, b = ((root / run / "metrics.json").read_bytes() for root in (apart, together))
        assert a == b and json.loads(a), run
    # a second pass reuses every finished stage
    assert stages.run_plan(stages.read_plan(_plan_from_bash(tmp_path, *commands(together)))) == 0


@pytest.mark.parametrize("script", ["table2.sh"])
def test_dry_run_is_the_same_with_one_process(script):
    def dry(extra):
        res = subprocess.run(["bash", str(REPO / "scripts" / script), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PROFILE": "cpu", **extra})
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert dry({"ONE_PROCESS": "1"}) == dry({})


def test_table2_with_one_process_stops_at_the_first_failing_stage(tmp_path):
    out = tmp_path / "out"
    for done in ("vanilla-s42", "vanilla-generate-s42"):
        (out / done).mkdir(parents=True)
        (out / done / "metrics.json").write_text("{}")
    res = subprocess.run(["bash", str(REPO / "scripts" / "table2.sh")], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PY": sys.executable, "OUT": str(out), "PROFILE": "cpu", "ONE_PROCESS": "1",
                              "MODEL": str(tmp_path / "no-such-model")})
    assert res.returncode == 1
    assert "[vanilla s42] reusing" in res.stdout and "[qlora s42]" in res.stdout
    assert "no-such-model" in res.stderr and "stage 'qlora s42' failed (command above); later stages not run" in res.stderr
    assert "[retrain s42]" not in res.stdout and sorted(p.name for p in out.iterdir()) == ["vanilla-generate-s42", "vanilla-s42"]


def test_one_process_records_the_command_of_each_stage_that_finished(tmp_path, tiny_model_dir, tiny_data_args):
    import shlex

    ok = ("eval", str(tmp_path / "eval"), sys.executable, "inference_spul.py", "--model_name", tiny_model_dir, *tiny_data_args,
          "--threads", "1", "--output_path", str(tmp_path / "eval"))
    bad = ("bad", str(tmp_path / "bad"), sys.executable, "spul.py", "--alpha", "-1", "--output_path", str(tmp_path / "bad"))
    calls = "\n".join("stage " + " ".join(shlex.quote(a) for a in rec) for rec in (ok, bad))
    res = subprocess.run(["bash", "-c", f"source scripts/common.sh\n{calls}\nrun_plan\n"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PROFILE": "cpu", "ONE_PROCESS": "1", "PY": sys.executable})
    assert res.returncode == 1 and "stage 'bad' failed" in res.stderr
    assert (tmp_path / ".eval.cmd").read_text() == " ".join(ok[2:]) + "\n"  # what common.sh's check_reuse compares
    assert not (tmp_path / ".bad.cmd").exists() and not (tmp_path / "bad").exists()
