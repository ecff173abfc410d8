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
    assert rows[2].endswith(",1234567.00,12.35,2048.40,99.50")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_override(tmp_path, capsys):
    a = fake_run(tmp_path / "x", 80.0)
    assert main([a, "--names", "Mine"]) == 0
    assert "| Mine | 80.00 / 40.00 |" in capsys.readouterr().out


def test_report_missing_metrics_is_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main([str(tmp_path / "x")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_point_labels_join_coinciding_runs_in_row_order():
    from utils.report import point_labels

    points = {"QLoRA": (98.44, 96.09), "GA": (43.75, 42.19), "SPUL": (54.69, 78.12), "NPO": (43.751, 42.189)}
    assert point_labels(points) == {(98.44, 96.09): "QLoRA", (43.75, 42.19): "GA, NPO", (54.69, 78.12): "SPUL"}
