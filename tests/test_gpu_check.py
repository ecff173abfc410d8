"""utils/gpu_check.py and scripts/gpu_check.sh without a GPU: --cpu_smoke runs every cell kind
on tiny configurations and writes the table and JSON; the real configurations have the published
parameter counts (counted on the meta device, nothing allocated); GA+GD at real shapes is skipped
with its stated estimate when it would not fit; out-of-memory and other failures stay in their
cell; without CUDA the module exits 2 with one line; the script's dry run parses."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import gpu_check

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--cpu_smoke", "--batch_size", "4", "--seq_len", "24", "--steps", "2", "--warmup_steps", "1"]
PUBLISHED = {"smollm2-135m": 134_515_008, "opt-1.3b": 1_315_758_080, "llama-2-7b": 6_738_415_616}


def test_cpu_smoke_runs_every_cell_and_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    results = gpu_check.main([*SMOKE, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["columns"] == list(gpu_check.COLUMNS) == ["model", "cell", "status", "median step s", "tokens/s", "peak GiB", "note"]
    rows = saved["rows"]
    assert [(r["model"], r["cell"]) for r in rows] == [(m, c) for m in gpu_check.SHAPES for c in gpu_check.CELLS]
    for r in rows:
        assert r["status"] == "ok", (r["model"], r["cell"], r["status"])
        assert r["step_seconds_median"] > 0 and len(r["step_seconds"]) == 2
        assert r["tokens_per_step"] == 4 * 24
        assert r["tokens_per_second"] == pytest.approx(r["tokens_per_step"] / r["step_seconds_median"])
        assert r["peak_gib"] > 0
    trainable = {r["cell"]: r["trainable_params"] for r in rows if r["model"] == "llama-2-7b"}
    assert 0 < trainable["spul"] < trainable["ga_gd"] and 0 < trainable["qlora"] < trainable["ga_gd"]
    assert saved["setup"]["random_weights"] is True and saved["setup"]["cpu_smoke"] is True
    table = capsys.readouterr().out
    assert table.startswith(saved["table"]) and results["table"] == saved["table"]
    assert "Random weights" in table and "| model | cell | status | median step s | tokens/s | peak GiB | note |" in table
    assert sum(line.startswith("| ") and "| ok |" in line for line in table.splitlines()) == 12
    assert "GA+GD memory estimate" in table


def test_skipped_and_failed_cells_stay_in_their_row(tmp_path, monkeypatch, capsys):
    def oom(ctx, row):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def broken(ctx, row):
        raise ValueError("boom\nsecond line")

    monkeypatch.setitem(gpu_check.CELL_FUNCTIONS, "spul", oom)
    monkeypatch.setitem(gpu_check.CELL_FUNCTIONS, "qlora", broken)
    out = tmp_path / "check.json"
    gpu_check.main([*SMOKE, "--models", "llama-2-7b", "--assume_free_gib", "1e-6", "--out", str(out)])
    rows = {r["cell"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["spul"]["status"] == "failed: out of memory"
    assert rows["qlora"]["status"] == "failed: ValueError: boom"
    assert rows["ga_gd"]["status"].startswith("skipped: needs ~0 GiB (20 B/param x ")
    assert rows["inference"]["status"] == "ok" and rows["inference"]["step_seconds_median"] > 0
    for cell in ("spul", "qlora", "ga_gd"):
        assert rows[cell]["step_seconds_median"] is None and rows[cell]["peak_gib"] is None
    table = capsys.readouterr().out
    assert "| failed: out of memory | - | - | - |" in table and "\nsecond line" not in table


@pytest.mark.parametrize("name", list(gpu_check.SHAPES))
def test_real_configs_have_the_published_parameter_counts_on_meta(name):
    shape = gpu_check.SHAPES[name]
    model = gpu_check.build_model(shape, "meta", torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    n = gpu_check.count_params(model)
    assert n == PUBLISHED[name] == shape.expected_params
    cfg = model.config
    expected = {"smollm2-135m": (576, 30, 9, 49152), "opt-1.3b": (2048, 24, 32, 50272), "llama-2-7b": (4096, 32, 32, 32000)}[name]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == expected
    if shape.arch == "llama":
        assert (cfg.num_key_value_heads, cfg.intermediate_size) == {"smollm2-135m": (3, 1536), "llama-2-7b": (32, 11008)}[name]
    else:
        assert cfg.ffn_dim == 8192
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (name != "llama-2-7b")


def test_full_fine_tuning_of_7b_at_real_shape_is_skipped_with_the_estimate(tmp_path):
    args = gpu_check.build_parser().parse_args(["--assume_free_gib", "80", "--tmp_dir", str(tmp_path)])
    ctx = gpu_check.Context(gpu_check.SHAPES["llama-2-7b"], args, torch.device("cpu"), torch.bfloat16, tiny=False, vocab=32000)
    row = gpu_check.run_cell(ctx, "ga_gd")  # estimated from the meta model: no weights allocated
    assert row.status.startswith("skipped: needs ~") and row.status.endswith(", 80 GiB free")
    est = gpu_check.ga_gd_estimate(PUBLISHED["llama-2-7b"], 32, 4096, 8, 128, "fp32", True)
    assert row.extra["estimate_gib"] == pytest.approx(est["gib"]) and est["gib"] > 100
    assert gpu_check.ga_gd_estimate(PUBLISHED["llama-2-7b"], 32, 4096, 8, 128, "bf16", True)["gib"] < 80
    assert gpu_check.ga_gd_estimate(PUBLISHED["opt-1.3b"], 24, 2048, 8, 128, "fp32", True)["gib"] < 80


def test_qlora_without_bitsandbytes_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    args = gpu_check.build_parser().parse_args([])
    ctx = gpu_check.Context(gpu_check.SHAPES["smollm2-135m"], args, torch.device("cpu"), torch.bfloat16, tiny=False, vocab=49152)
    row = gpu_check.run_cell(ctx, "qlora")
    assert row.status.startswith("skipped: bitsandbytes not importable")


def test_without_cuda_the_module_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "utils.gpu_check", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.strip().splitlines() == [gpu_check.NO_CUDA]
    assert not (tmp_path / "x.json").exists()


def test_module_dry_run_prints_the_plan_without_a_gpu(capsys):
    assert gpu_check.main(["--dry-run", "--models", "opt-1.3b", "llama-2-7b"]) is None
    text = capsys.readouterr().out
    assert "1,315,758,080 parameters" in text and "6,738,415,616 parameters" in text and "smollm2" not in text


@pytest.mark.parametrize("extra", [[], ["--models", "opt-1.3b", "--steps", "2", "--out", "runs/a b.json"]])
def test_script_dry_run_prints_a_command_the_parser_accepts(extra):
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", *extra],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    cmd = shlex.split(lines[0])
    assert cmd[1:3] == ["-m", "utils.gpu_check"] and "--dry-run" not in cmd
    args = gpu_check.build_parser().parse_args(cmd[3:])
    if extra:
        assert args.models == ["opt-1.3b"] and args.steps == 2 and args.out == "runs/a b.json"
    else:
        assert args.models == list(gpu_check.SHAPES) and args.steps == 3 and args.batch_size == 8 and args.seq_len == 128


def test_bad_flags_give_one_line_and_status_2(capsys):
    for argv in (["--steps", "0"], ["--models", "gpt-5"], ["--batch_size", "1"]):
        with pytest.raises(SystemExit) as stop:
            gpu_check.main(argv)
        assert stop.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
