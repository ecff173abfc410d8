"""The accelerate-based training loop's flags: --mixed_precision (auto resolution, bf16 autocast
on CPU), --gradient_checkpointing (ignored with a warning on CPU), --gradient_accumulation_steps
(CLI checks, passed through check_resume into TrainConfig)."""
import pytest
import torch

from tests.test_training import features, loss_fn, make_model
from utils import cli
from utils.training import LaunchError, TrainConfig, resolve_mixed_precision, train


def test_mixed_precision_auto_resolution(monkeypatch):
    assert resolve_mixed_precision("auto", "cpu") == "no"  # CPU stays fp32
    assert resolve_mixed_precision("no", "cpu") == "no" and resolve_mixed_precision("bf16", "cpu") == "bf16"
    with pytest.raises(LaunchError, match="fp16: needs a CUDA device"):
        resolve_mixed_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", "cuda", [torch.zeros(1)]) == "fp16"  # older GPUs
    assert resolve_mixed_precision("auto", "cuda", [torch.zeros(1, dtype=torch.float16)]) == "no"  # fp16 weights: no scaler
    with pytest.raises(ValueError):
        resolve_mixed_precision("fp8", "cpu")


def test_bf16_autocast_on_cpu_trains_and_is_recorded():
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = train(model, model.parameters(), loss_fn, features(8), TrainConfig(lr=1e-2, num_epochs=1, batch_size=4, mixed_precision="bf16"), "cpu", 0)
    assert stats.mixed_precision == "bf16" and stats.steps == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast only: weights stay fp32
    # the next call may ask for another precision (accelerate's state is reset per call)
    stats = train(model, model.parameters(), loss_fn, features(8), TrainConfig(lr=1e-2, num_epochs=1, batch_size=4), "cpu", 0)
    assert stats.mixed_precision == "no"


def test_gradient_checkpointing_is_ignored_on_cpu_with_one_line(capsys):
    model = make_model()
    train(model, model.parameters(), loss_fn, features(4), TrainConfig(lr=1e-3, num_epochs=1, batch_size=4, gradient_checkpointing=True), "cpu", 0)
    err = [line for line in capsys.readouterr().err.splitlines() if "gradient_checkpointing" in line]
    assert err == ["warning: --gradient_checkpointing is ignored on CPU (it only saves GPU memory)"]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_train_flags_parse_check_and_reach_the_train_config(tmp_path):
    import spul

    p = spul.build_parser()
    args = p.parse_args(["--gradient_accumulation_steps", "3", "--mixed_precision", "bf16", "--gradient_checkpointing"])
    assert (args.gradient_accumulation_steps, args.mixed_precision, args.gradient_checkpointing) == (3, "bf16", True)
    defaults = p.parse_args([])
    assert (defaults.gradient_accumulation_steps, defaults.mixed_precision, defaults.gradient_checkpointing) == (1, "auto", False)
    bad = p.parse_args(["--gradient_accumulation_steps", "0"])
    with pytest.raises(cli.UsageError, match="--gradient_accumulation_steps 0: must be at least 1"):
        cli.check_common(bad)
    fields = cli.check_resume(args, tmp_path / "run", {})
    cfg = TrainConfig(1e-3, 1, 4, **fields)
    assert (cfg.gradient_accumulation_steps, cfg.mixed_precision, cfg.gradient_checkpointing) == (3, "bf16", True)
