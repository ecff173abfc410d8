"""The report turns run folders into the paper's table, exact to two decimals."""
import json

from utils.report import main


def fake_run(path, acc):
    path.mkdir()
    metrics = {s: {"accuracy": acc + i, "f1": acc / 2 + i} for i, s in
               enumerate(["train_retain", "train_forget", "test_retain", "test_forget"])}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return str(path)


def test_report_markdown_and_csv(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 90.0), fake_run(tmp_path / "b", 10.125)
    md, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
    assert main([a, b, "--names", "QLoRA", "SPUL", "--markdown", str(md), "--csv", str(csv_path)]) == 0
    text = md.read_text()
    assert "| QLoRA | 90.00 / 45.00 | 91.00 / 46.00 | 92.00 / 47.00 | 93.00 / 48.00 |" in text
    assert "| SPUL | 10.12 / 5.06 | 11.12 / 6.06 |" in text
    assert csv_path.read_text().splitlines()[1] == "QLoRA,90.00,45.00,91.00,46.00,92.00,47.00,93.00,48.00"


def test_report_missing_metrics_is_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main([str(tmp_path / "x")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
