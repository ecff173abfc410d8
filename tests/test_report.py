"""The report turns run folders into the paper's table, exact to two decimals."""
import json

from utils.report import main

SPLITS = ["train_retain", "train_forget", "test_retain", "test_forget"]


def fake_run(path, acc, stats=None):
    path.mkdir(parents=True)
    metrics = {s: {"accuracy": acc + i, "f1": acc / 2 + i} for i, s in enumerate(SPLITS)}
    (path / "metrics.json").write_text(json.dumps(metrics))
    if stats:
        (path / "train_stats.json").write_text(json.dumps(stats))
    return str(path)


STATS = {"trainable_params": 1234567, "seconds_per_epoch": 12.345, "peak_memory_mb": 2048.4, "tokens_per_second": 99.5}


def test_report_markdown_csv_and_plot(tmp_path):
    runs = [fake_run(tmp_path / "vanilla-s1", 50.0), fake_run(tmp_path / "qlora-s1", 90.0, STATS),
            fake_run(tmp_path / "qlora-s2", 94.0, STATS), fake_run(tmp_path / "spul-a0.1-b0-s1", 10.125)]
    md, csv_path, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.png"
    assert main(runs + ["--markdown", str(md), "--csv", str(csv_path), "--plot", str(png)]) == 0
    lines = md.read_text().splitlines()
    assert lines[2] == "| Vanilla (argmax) | 50.00 / 25.00 | 51.00 / 26.00 | 52.00 / 27.00 | 53.00 / 28.00 | - | - | - | - |"
    # two seeds: mean 92, population std 2; F1 mean 46, std 1
    assert lines[3] == ("| QLoRA | 92.00±2.00 / 46.00±1.00 | 93.00±2.00 / 47.00±1.00 | 94.00±2.00 / 48.00±1.00 "
                        "| 95.00±2.00 / 49.00±1.00 | 1,234,567 | 12.3 | 2048 | 100 |")
    assert lines[4].startswith("| spul-a0.1-b0 | 10.12 / 5.06 | 11.12 / 6.06 |")
    rows = csv_path.read_text().splitlines()
    assert rows[2].startswith("QLoRA,2,92.00,46.00,93.00,47.00,94.00,48.00,95.00,49.00,2.00,1.00,")
    assert ",1234567.00,12.35,2048.40,99.50," in rows[2] and rows[2].endswith(",,")  # no audit figures: empty cells
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_override(tmp_path, capsys):
    a = fake_run(tmp_path / "x", 80.0)
    assert main([a, "--names", "Mine"]) == 0
    assert "| Mine | 80.00 / 40.00 |" in capsys.readouterr().out


def test_report_missing_metrics_is_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main([str(tmp_path / "x")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_report_makes_the_output_folders_and_refuses_a_folder_as_a_file(tmp_path, capsys):
    run = fake_run(tmp_path / "x", 80.0)
    md = tmp_path / "new" / "deeper" / "t.md"
    assert main([run, "--markdown", str(md)]) == 0 and md.read_text().startswith("| method |")
    capsys.readouterr()
    assert main([run, "--csv", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--csv" in err and "is a folder" in err
    (tmp_path / "file").write_text("")
    assert main([run, "--plot", str(tmp_path / "file" / "t.png")]) == 2
    assert "--plot" in capsys.readouterr().err


def test_point_labels_join_coinciding_runs_in_row_order():
    from utils.report import point_labels

    points = {"QLoRA": (98.44, 96.09), "GA": (43.75, 42.19), "SPUL": (54.69, 78.12), "NPO": (43.751, 42.189)}
    assert point_labels(points) == {(98.44, 96.09): "QLoRA", (43.75, 42.19): "GA, NPO", (54.69, 78.12): "SPUL"}


def fake_audited_run(path, seed, forget_auc, p_forget, retain_only=False):
    """A run folder with metrics, a manifest (seed, oracle or not), audit.json and records whose
    train_forget true-label probabilities are ``p_forget`` (labels all 1)."""
    import math

    fake_run(path, 80.0)
    (path / "manifest.json").write_text(json.dumps({"kind": "qlora", "seed": seed, "retain_only": retain_only}))
    (path / "audit.json").write_text(json.dumps({"mia": {"forget": {"loss_auc": forget_auc, "logit_auc": forget_auc / 2},
                                                         "retain": {"loss_auc": 0.5, "logit_auc": 0.5}}}))
    records = [{"split": "train_forget", "row": i, "label": 1, "pred_id": 0, "label_logprobs": [math.log(1 - p), math.log(p)]}
               for i, p in enumerate(p_forget)]
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_audit_columns_against_the_retrain_oracle_of_the_same_seed(tmp_path):
    from scipy.stats import ks_2samp

    oracle_p, run_p = [0.1, 0.2, 0.3, 0.4], [0.6, 0.7, 0.8, 0.9]
    runs = [fake_audited_run(tmp_path / "retrain-s1", 1, 0.5, oracle_p, retain_only=True),
            fake_audited_run(tmp_path / "spul-s1", 1, 0.6, run_p),
            fake_audited_run(tmp_path / "other-s2", 2, 0.6, run_p)]  # seed 2 has no oracle
    md, csv_path, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "mia.png"
    assert main(runs + ["--markdown", str(md), "--csv", str(csv_path), "--mia_plot", str(png)]) == 0
    lines = md.read_text().splitlines()
    assert "MIA AUC forget (LOSS) | MIA AUC forget (logit) | privleak % (LOSS) | privleak % (logit) | KS p (forget quality)" in lines[0]
    ks = ks_2samp(run_p, oracle_p).pvalue  # fully separated samples of 4: 2 / C(8, 4)
    assert abs(ks - 2 / 70) < 1e-12
    assert lines[2].startswith("| Retrain |") and "| 0.500 | 0.250 | +0.0 | +0.0 | 1 |" in lines[2]
    assert f"| 0.600 | 0.300 | +20.0 | +20.0 | {ks:.3g} |" in lines[3]
    assert "| 0.600 | 0.300 | - | - | - |" in lines[4]  # no oracle for its seed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_refuses_an_oracle_on_other_rows(tmp_path, capsys):
    runs = [fake_audited_run(tmp_path / "retrain-s1", 1, 0.5, [0.1, 0.2], retain_only=True),
            fake_audited_run(tmp_path / "spul-s1", 1, 0.6, [0.6, 0.7, 0.8])]
    assert main(runs) == 2
    assert "differ from the retrain oracle" in capsys.readouterr().err


def fake_recorded_run(path, seed, outcomes, labels, tokenizer):
    """A run folder whose records answer review i of every split with its true label when
    ``outcomes[i]`` (else with a generic label), with the metrics that gives and the tokenizer."""
    from utils.evaluation import label_token_ids
    from utils.template import Encoder

    ids = label_token_ids(Encoder(tokenizer, 64), ["negative", "positive"])
    unknown = tokenizer.convert_tokens_to_ids("unknown")
    path.mkdir(parents=True)
    tokenizer.save_pretrained(path / "tokenizer")
    (path / "manifest.json").write_text(json.dumps({"kind": "spul", "seed": seed, "task": "sentiment"}))
    acc = 100 * sum(outcomes) / len(outcomes)
    (path / "metrics.json").write_text(json.dumps({s: {"accuracy": acc, "f1": acc} for s in SPLITS}))
    records = [{"split": s, "row": i, "label": y, "pred_id": ids[y] if ok else unknown, "label_logprobs": [-0.7, -0.7]}
               for s in SPLITS for i, (ok, y) in enumerate(zip(outcomes, labels))]
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_spread_reads_review_outcomes_from_the_records(tmp_path, capsys):
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    labels = [0, 1, 1, 0]
    runs = [fake_recorded_run(tmp_path / "spul-s1", 1, [1, 1, 0, 0], labels, tok),
            fake_recorded_run(tmp_path / "spul-s2", 2, [1, 0, 0, 0], labels, tok),
            fake_run(tmp_path / "qlora-s1", 90.0)]  # one seed: no spread row, no records needed
    out = tmp_path / "spread.md"
    assert main(runs + ["--spread", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2 + len(SPLITS)
    assert lines[2] == "| SPUL | train retain | 50.00 / 25.00 | 12.50 | 12.50 | 75.0% |"
    assert "seed spread:" in capsys.readouterr().out


def test_spread_refuses_records_that_disagree_with_the_metrics(tmp_path, capsys):
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    a = fake_recorded_run(tmp_path / "spul-s1", 1, [1, 1, 0, 0], [0, 1, 1, 0], tok)
    b = fake_recorded_run(tmp_path / "spul-s2", 2, [1, 0, 0, 0], [0, 1, 1, 0], tok)
    (tmp_path / "spul-s2" / "metrics.json").write_text(json.dumps({s: {"accuracy": 50.0, "f1": 50.0} for s in SPLITS}))
    out = tmp_path / "spread.md"
    assert main([a, b, "--spread", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not give its metrics.json accuracy (50.00)" in err
    assert not out.exists()


def test_spread_refuses_seeds_on_other_data_and_runs_without_a_tokenizer(tmp_path, capsys):
    import shutil

    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    a = fake_recorded_run(tmp_path / "spul-s1", 1, [1, 1, 0, 0], [0, 1, 1, 0], tok)
    b = fake_recorded_run(tmp_path / "spul-s2", 2, [1, 1, 0, 0], [1, 1, 1, 0], tok)
    assert main([a, b, "--spread", str(tmp_path / "s.md")]) == 2
    assert "the seeds' train_retain rows differ" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "spul-s1" / "tokenizer")
    assert main([a, b, "--spread", str(tmp_path / "s.md")]) == 2
    assert "no tokenizer/ here or in the run it evaluated" in capsys.readouterr().err


def test_spread_without_a_row_of_two_seeds_is_one_line(tmp_path, capsys):
    runs = [fake_run(tmp_path / "qlora-s1", 90.0), fake_run(tmp_path / "spul-s1", 10.0)]
    assert main(runs + ["--spread", str(tmp_path / "s.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--spread: no row has two seeds or more" in err


def seeded_run(path, seed, accs):
    """A run folder with its seed in the manifest and ACC ``accs[i]`` on split i."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"seed": seed}))
    (path / "metrics.json").write_text(json.dumps({s: {"accuracy": a, "f1": a} for s, a in zip(SPLITS, accs)}))
    return str(path)


def test_paired_differences_against_the_starting_model(tmp_path, capsys):
    runs = [seeded_run(tmp_path / "qlora-s1", 1, [96, 95, 86, 82]), seeded_run(tmp_path / "qlora-s2", 2, [98, 97, 84, 80]),
            seeded_run(tmp_path / "spul-s2", 2, [97, 3, 80, 10]), seeded_run(tmp_path / "spul-s1", 1, [95, 1, 84, 14]),
            seeded_run(tmp_path / "gradient_ascent-s1", 1, [90, 90, 80, 80]),  # one seed: no row
            seeded_run(tmp_path / "npo-s1", 1, [90, 90, 80, 80]), seeded_run(tmp_path / "npo-s3", 3, [90, 90, 80, 80])]
    out = tmp_path / "paired.md"
    assert main(runs + ["--paired", "qlora", "--paired_markdown", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("ACC minus QLoRA's on the same seed")
    # SPUL minus QLoRA, paired by seed (not by folder order): train retain -1 and -1 (std 0); train forget -94 and
    # -94; test retain -2 and -4: mean -3, std sqrt(2), t(0.975, 1) = 12.7062 -> half-width 12.7062 * sqrt(2) / sqrt(2);
    # test forget -68 and -70: mean -69, the same half-width
    assert lines[4] == ("| SPUL | 2 | -1.00±0.00 [-1.00, -1.00] | -94.00±0.00 [-94.00, -94.00] "
                        "| -3.00±1.41 [-15.71, +9.71] | -69.00±1.41 [-81.71, -56.29] |")
    assert len(lines) == 5  # NPO has a seed (3) without a QLoRA run, GA one seed: neither is paired
    assert "ACC minus QLoRA's" in capsys.readouterr().out


def test_paired_refusals_are_one_line(tmp_path, capsys):
    runs = [seeded_run(tmp_path / "qlora-s1", 1, [96, 95, 86, 82]), seeded_run(tmp_path / "spul-s1", 1, [95, 1, 84, 14])]
    for argv, needle in ((runs + ["--paired", "Retrain"], "--paired Retrain: no such row"),
                         (runs + ["--paired", "QLoRA"], "no other row has two seeds or more")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err
    runs.append(fake_run(tmp_path / "spul-s2", 90.0))  # no manifest: no seed to pair it by
    assert main(runs + ["--paired", "qlora"]) == 2
    assert "spul-s2: no seed in its manifest.json" in capsys.readouterr().err
    import pytest
    with pytest.raises(SystemExit):
        main(runs[:2] + ["--paired_markdown", str(tmp_path / "p.md")])
    assert "--paired_markdown: give --paired ROW as well" in capsys.readouterr().err
