"""Model selection on validation splits (utils/select.py): the stated criterion on a tiny grid."""
import json

import pytest

from utils import select


def run(folder, kind, val_retain, val_forget, train_forget, method=None, test=None, **flags):
    folder.mkdir(parents=True)
    metrics = {"val_retain": {"accuracy": val_retain}, "val_forget": {"accuracy": val_forget},
               "train_forget": {"accuracy": train_forget}}
    if test is not None:
        metrics["test_forget"] = {"accuracy": test}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.json").write_text(json.dumps({"seed": 1, **flags}))
    (folder / "manifest.json").write_text(json.dumps({"kind": kind, "method": method}))
    return folder


def seeded_run(tmp_path):
    """``run`` for a SPUL setting on one of several seeds: NAME-sSEED with that seed in its config."""
    def seeded(name, seed, vr, vf, tf, **flags):
        r = run(tmp_path / f"{name}-s{seed}", "spul", vr, vf, tf, **flags)
        (r / "config.json").write_text(json.dumps({"seed": seed, **flags}))
        return r
    return seeded


def test_picks_lowest_forget_within_the_utility_bound(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    grid = [
        run(tmp_path / "a", "spul", 79.0, 60.0, 50.0, lr=1e-3, alpha=1, beta=0.5),   # forget 55
        run(tmp_path / "b", "spul", 76.0, 30.0, 20.0, lr=3e-3, alpha=1, beta=0.5),   # forget 25: best within bound
        run(tmp_path / "c", "spul", 74.9, 5.0, 5.0, lr=1e-2, alpha=1, beta=0.5),     # forgets most, 5.1 points below
    ]
    out = select.select_all(ref, grid)
    chosen = out["selected"]["spul"]
    assert chosen["run"] == str(grid[1]) and chosen["constraint_met"]
    assert chosen["flags"] == {"lr": 3e-3, "alpha": 1, "beta": 0.5}
    assert chosen["forget_score"] == pytest.approx(25.0) and out["reference_val_retain"] == 80.0


def test_ties_go_to_higher_val_retain_then_grid_order(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    a = run(tmp_path / "a", "baseline", 77.0, 40.0, 40.0, method="npo", lr=1e-5)
    b = run(tmp_path / "b", "baseline", 79.0, 30.0, 50.0, method="npo", lr=3e-5)  # same score 40, more retain
    c = run(tmp_path / "c", "baseline", 79.0, 50.0, 30.0, method="npo", lr=1e-4)  # same again, later in grid
    assert select.select_all(ref, [a, b, c])["selected"]["npo"]["run"] == str(b)


def test_no_run_within_the_bound_takes_least_damage_and_says_so(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    grid = [run(tmp_path / f"g{i}", "baseline", vr, 0.0, 0.0, method="gradient_ascent", lr=lr)
            for i, (vr, lr) in enumerate([(50.0, 1e-4), (62.0, 1e-5), (55.0, 1e-6)])]
    chosen = select.select_all(ref, grid)["selected"]["gradient_ascent"]
    assert chosen["run"] == str(grid[1]) and not chosen["constraint_met"]


def test_methods_are_grouped_and_env_lines_carry_the_flags(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    grid = [run(tmp_path / "s", "spul", 78.0, 10.0, 10.0, lr=3e-3, num_epochs=6, alpha=1, beta=2, prompt_norm="token"),
            run(tmp_path / "g", "baseline", 78.0, 70.0, 60.0, method="gradient_ascent_descent", lr=1e-5, num_epochs=1)]
    out = select.select_all(ref, grid)
    assert set(out["selected"]) == {"spul", "gradient_ascent_descent"}
    lines = select.env_lines(out)
    assert "SEL_SPUL='--lr 0.003 --num_epochs 6 --alpha 1 --beta 2 --prompt_norm token'" in lines
    assert "SEL_GRADIENT_ASCENT_DESCENT='--lr 1e-05 --num_epochs 1'" in lines
    assert f"SELRUN_SPUL={grid[0]}" in lines and "SEL_SEED=1" in lines  # the chosen runs and their seed


def test_test_metrics_never_change_the_choice(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    a = run(tmp_path / "a", "spul", 78.0, 30.0, 30.0, test=90.0, lr=1e-3)
    b = run(tmp_path / "b", "spul", 78.0, 40.0, 40.0, test=0.0, lr=3e-3)
    chosen = select.select_all(ref, [a, b])["selected"]["spul"]
    assert chosen["run"] == str(a)
    assert "test_forget" not in json.dumps(select.select_all(ref, [a, b])["grid"])


def test_cli_writes_json_and_env_and_refuses_runs_without_val(tmp_path, capsys):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    a = run(tmp_path / "a", "spul", 78.0, 30.0, 30.0, lr=1e-3)
    rc = select.main(["--reference", str(ref), "--runs", str(a), "--json", str(tmp_path / "s.json"), "--env", str(tmp_path / "s.env")])
    assert rc == 0
    assert json.loads((tmp_path / "s.json").read_text())["selected"]["spul"]["flags"] == {"lr": 1e-3}
    assert "SEL_SPUL='--lr 0.001'" in (tmp_path / "s.env").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps({"train_forget": {"accuracy": 1.0}}))
    (bad / "config.json").write_text("{}")
    (bad / "manifest.json").write_text(json.dumps({"kind": "spul"}))
    assert select.main(["--reference", str(ref), "--runs", str(bad)]) == 2
    assert "no metrics for val_retain" in capsys.readouterr().err


def test_best_pools_methods_and_follows_eval_folders_to_their_run(tmp_path, capsys):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    ga = run(tmp_path / "ga", "baseline", 60.0, 10.0, 10.0, method="gradient_ascent", lr=1e-5)  # forgets, breaks retain
    gd = run(tmp_path / "gd", "baseline", 78.0, 70.0, 60.0, method="gradient_ascent_descent", lr=1e-5)  # forget 65
    npo_run = run(tmp_path / "npo", "baseline", 79.0, 80.0, 90.0, method="npo", lr=1e-6)  # forget 85
    ev = tmp_path / "gd-eval"  # an eval folder of gd, as table2.sh makes for the selection seed
    run(ev, "eval", 78.0, 70.0, 60.0)
    (ev / "manifest.json").write_text(json.dumps({"kind": "eval", "source": str(gd),
                                                  "evaluated": {"kind": "baseline", "method": "gradient_ascent_descent"}}))
    assert select.main(["--reference", str(ref), "--runs", str(ga), str(npo_run), str(ev), "--best"]) == 0
    assert capsys.readouterr().out.strip() == str(gd)
    assert select.main(["--reference", str(ref), "--runs", str(ga), str(npo_run), str(gd), "--best"]) == 0
    assert capsys.readouterr().out.strip() == str(gd)


def test_hard_prefix_is_carried_when_given_and_dropped_at_its_default(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    plain = run(tmp_path / "p", "spul", 78.0, 60.0, 60.0, lr=3e-3, hard_prefix="none")
    prefixed = run(tmp_path / "h", "spul", 78.0, 40.0, 40.0, lr=3e-3, hard_prefix="instruction")
    out = select.select_all(ref, [plain, prefixed])
    assert out["grid"]["spul"][0]["flags"] == {"lr": 3e-3}
    assert "SEL_SPUL='--lr 0.003 --hard_prefix instruction'" in select.env_lines(out)


def test_a_weight_average_is_a_setting_of_its_own_and_its_default_is_dropped(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    old = run(tmp_path / "o", "spul", 78.0, 30.0, 30.0, lr=3e-3)  # a run from before the flag existed
    last = run(tmp_path / "l", "spul", 78.0, 20.0, 20.0, lr=3e-3, ema_decay=0.0)
    averaged = run(tmp_path / "a", "spul", 79.0, 10.0, 10.0, lr=3e-3, ema_decay=0.99)
    with pytest.raises(select.SelectionError, match="two runs of the same setting"):
        select.select_all(ref, [old, last])  # 0 is "not given": the same setting
    out = select.select_all(ref, [last, averaged])
    assert [r["flags"] for r in out["grid"]["spul"]] == [{"lr": 3e-3}, {"lr": 3e-3, "ema_decay": 0.99}]
    assert "SEL_SPUL='--lr 0.003 --ema_decay 0.99'" in select.env_lines(out)


def test_update_replaces_one_methods_lines_and_keeps_the_others(tmp_path, capsys):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    env = tmp_path / "s.env"
    env.write_text("# old\nSEL_SEED=1\nSEL_SPUL='--lr 0.01'\nSELRUN_SPUL=old/spul\n"
                   "SEL_NPO='--lr 1e-06'\nSELRUN_NPO=old/npo\n")
    a = run(tmp_path / "a", "spul", 78.0, 30.0, 30.0, lr=3e-3)
    assert select.main(["--reference", str(ref), "--runs", str(a), "--env", str(env), "--update"]) == 0
    lines = env.read_text().splitlines()
    assert "SEL_SPUL='--lr 0.003'" in lines and f"SELRUN_SPUL={a}" in lines
    assert "SEL_NPO='--lr 1e-06'" in lines and "SELRUN_NPO=old/npo" in lines  # kept
    assert "SEL_SPUL='--lr 0.01'" not in lines and lines.count("SEL_SEED=1") == 1
    # without --update the file holds only this selection
    assert select.main(["--reference", str(ref), "--runs", str(a), "--env", str(env)]) == 0
    assert "SEL_NPO" not in env.read_text()
    # kept lines chosen on another seed: one line, the file untouched
    env.write_text("SEL_SEED=2\nSEL_NPO='--lr 1e-06'\n")
    assert select.main(["--reference", str(ref), "--runs", str(a), "--env", str(env), "--update"]) == 2
    assert "SEL_SEED=2" in capsys.readouterr().err and env.read_text() == "SEL_SEED=2\nSEL_NPO='--lr 1e-06'\n"


def test_several_seeds_are_judged_on_the_mean_per_setting(tmp_path):
    seeded = seeded_run(tmp_path)
    refs = [run(tmp_path / "q1", "qlora", 80.0, 85.0, 98.0), run(tmp_path / "q2", "qlora", 82.0, 85.0, 98.0)]
    lucky = [seeded("a", 1, 80.0, 10.0, 6.0, lr=3e-3), seeded("a", 2, 70.0, 70.0, 70.0, lr=3e-3)]  # mean 75: out
    steady = [seeded("b", 1, 78.0, 30.0, 30.0, lr=1e-3), seeded("b", 2, 78.0, 40.0, 40.0, lr=1e-3)]  # mean 78, forget 35
    # on seed 1 alone the lucky setting wins
    assert select.select_all(refs[0], [lucky[0], steady[0]])["selected"]["spul"]["run"] == str(lucky[0])
    out = select.select_all(refs, lucky + steady)
    chosen = out["selected"]["spul"]
    assert out["reference_val_retain"] == 81.0 and chosen["val_retain_floor"] == 76.0
    assert chosen["run"] == str(steady[0]) and chosen["seeds"] == [1, 2] and chosen["constraint_met"]
    assert chosen["forget_score"] == pytest.approx(35.0) and chosen["val_retain"] == pytest.approx(78.0)
    assert f"SELRUN_SPUL={steady[0]}" in select.env_lines(out) and "SEL_SEED=1" in select.env_lines(out)
    # a setting missing a seed is refused in one line
    with pytest.raises(select.SelectionError, match="different seeds"):
        select.select_all(refs, lucky + steady[:1])


def test_worst_over_seeds_judges_each_metric_at_its_worst_seed(tmp_path):
    seeded = seeded_run(tmp_path)
    refs = [run(tmp_path / "q1", "qlora", 80.0, 85.0, 98.0), run(tmp_path / "q2", "qlora", 82.0, 85.0, 98.0)]
    # one seed hedges: mean val retain 77 (within the 76 bound), mean forget score (10 + 10) / 2 = 10
    hedge = [seeded("a", 1, 80.0, 0.0, 0.0, lr=3e-3), seeded("a", 2, 74.0, 20.0, 20.0, lr=3e-3)]
    # both seeds forget a little less on average, but alike: score (11 + 9.5) / 2 = 10.25, at worst 11
    steady = [seeded("b", 1, 78.0, 10.0, 8.0, lr=1e-3), seeded("b", 2, 77.0, 12.0, 11.0, lr=1e-3)]
    by_mean = select.select_all(refs, hedge + steady)["selected"]["spul"]
    assert by_mean["run"] == str(hedge[0]) and by_mean["forget_score"] == pytest.approx(10.0)
    out = select.select_all(refs, hedge + steady, over_seeds="worst")
    chosen = out["selected"]["spul"]
    assert out["over_seeds"] == "worst" and chosen["run"] == str(steady[0])
    assert chosen["val_retain"] == 77.0 and chosen["val_forget"] == 12.0 and chosen["train_forget"] == 11.0
    grid = {tuple(r["runs"]): r for r in out["grid"]["spul"]}
    assert grid[(str(hedge[0]), str(hedge[1]))]["val_retain"] == 74.0  # below the bound at its worst seed
    assert "worst over the seeds" in select.grid_table(out).splitlines()[0]
    with pytest.raises(select.SelectionError, match="--over_seeds median"):
        select.select_all(refs, hedge + steady, over_seeds="median")


def test_grid_table_lists_every_setting_marks_the_choice_and_the_bound(tmp_path):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    grid = [run(tmp_path / "a", "baseline", 79.0, 60.0, 50.0, method="npo", lr=1e-6),   # score 55, within
            run(tmp_path / "b", "baseline", 75.5, 30.0, 20.0, method="npo", lr=1e-5),   # score 25, within (75 bound)
            run(tmp_path / "c", "baseline", 74.0, 5.0, 5.0, method="npo", lr=1e-4)]     # score 5, outside
    table = select.grid_table(select.select_all(ref, grid)).splitlines()
    assert table[0].startswith("utility bound: val_retain >= 75.00 (reference 80.00 - 5)")
    rows = [line for line in table if line.startswith("| npo")]
    assert rows == ["| npo | --lr 1e-06 | 1 | 50.00 | 79.00 | 60.00 | 55.00 | yes |",
                    "| npo | --lr 1e-05 **chosen** | 1 | 20.00 | 75.50 | 30.00 | 25.00 | yes |",
                    "| npo | --lr 0.0001 | 1 | 5.00 | 74.00 | 5.00 | 5.00 | no |"]


def test_markdown_flag_writes_the_printed_table(tmp_path, capsys):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    a = run(tmp_path / "a", "baseline", 79.0, 60.0, 50.0, method="npo", lr=1e-6)
    out = tmp_path / "grid.md"
    assert select.main(["--reference", str(ref), "--runs", str(a), "--markdown", str(out)]) == 0
    assert out.read_text() in capsys.readouterr().out and "| npo | --lr 1e-06 **chosen** |" in out.read_text()


def test_an_output_in_a_missing_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    ref = run(tmp_path / "qlora", "qlora", 80.0, 85.0, 98.0)
    a = run(tmp_path / "a", "baseline", 79.0, 60.0, 50.0, method="npo", lr=1e-6)
    env = tmp_path / "sel.env"
    rc = select.main(["--reference", str(ref), "--runs", str(a), "--env", str(env),
                      "--markdown", str(tmp_path / "nowhere" / "grid.md")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --markdown") and len(err.strip().splitlines()) == 1
    assert not env.exists()
