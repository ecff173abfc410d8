"""End to end on a tiny random model: qlora.py -> spul.py -> inference_spul.py (with and
without the prompt), prompts bound to their model, bad input refused with one line."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import inference_spul
import qlora
import spul
from tests.conftest import TINY_DATA_ARGS
from tests.tiny import save_tiny_model
from utils.invariant import strict_blas
from utils.select import attempt_seeds
from utils.spul_run import kept_attempt

SPLITS = ("train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget")
SPUL_ARGS = ["--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-2",
             "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "16"]


@pytest.fixture(scope="module")
def data_args(sst2_data):
    return ["--data_root", str(sst2_data)] + TINY_DATA_ARGS


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data_args):
    root = tmp_path_factory.mktemp("spul_runs")
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--output_path", str(root / "qlora")] + data_args)
    spul.main(["--model_checkpoints", str(root / "qlora"), "--output_path", str(root / "spul")] + SPUL_ARGS + data_args)
    return root


def read(path):
    return json.loads(path.read_text())


def evaluate(run, out, data_args, *extra):
    inference_spul.main(["--model_checkpoints", str(run), "--output_path", str(out), *extra] + data_args)
    return read(out / "metrics.json")


def refused(capsys, main, argv):
    capsys.readouterr()  # drop what earlier calls printed
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_spul_writes_complete_run_folder(runs):
    run = runs / "spul"
    files = {p.name for p in run.iterdir()}
    assert {"prompt", "prompt_encoder.safetensors", "tokenizer", "config.json", "metrics.json",
            "manifest.json", "train_stats.json"} <= files
    assert (run / "prompt" / "adapter_model.safetensors").is_file()
    assert read(run / "prompt" / "adapter_config.json")["peft_type"] == "P_TUNING"
    m = read(run / "manifest.json")
    qm = read(runs / "qlora" / "manifest.json")
    assert m["kind"] == "spul" and m["source_kind"] == "qlora"
    assert m["qlora_run"] == str((runs / "qlora").resolve())
    assert m["qlora_adapter_sha256"] == qm["adapter_sha256"]
    assert m["base_weights_sha256"] == qm["base_weights_sha256"] and m["base_model"] == qm["base_model"]
    assert m["prompt"]["num_virtual_tokens"] == 4 and m["prompt"]["encoder_hidden_size"] == 16
    assert len(m["tokenizer"]["sha256"]) == 64 and m["template"] and m["versions"]["peft"]
    assert m["versions"]["cpu"] and m["versions"]["torch_cpu_capability"]  # float results depend on the CPU too
    assert m["forget_size"] == 1.0 and m["seed"] == 42 and m["splits"]["train_forget"]["rows"] == 12
    assert sum(m["generic_label_counts"].values()) == 12
    assert (m["alpha"], m["beta"]) == (1.0, 0.5)
    config = read(run / "config.json")
    assert config["ptuning_num_tokens"] == 4 and config["warmup_ratio"] == 0.1 and config["max_grad_norm"] == 0.3
    stats = read(run / "train_stats.json")
    assert stats["steps"] == 3 and stats["trainable_params"] == m["prompt"]["trainable_params"]
    assert len(stats["epoch_means"]) == 1 and set(stats["epoch_means"][0]) == {"loss", "L_f", "L_r", "L_kl"}
    ref = stats["kl_reference"]  # the default reference cache: one epoch, so every retain row is a first visit
    assert ref["steps_with_reference"] == 3 and ref["bytes_kept_between_steps"] > 0 and config["cache_reference"] is True
    assert ref["reference_cache_hits"] == 0 and ref["reference_cache_misses"] > 0
    assert set(read(run / "metrics.json")) == set(SPLITS)


def test_paper_defaults():
    args = spul.build_parser().parse_args([])
    assert (args.lr, args.num_epochs, args.train_batch_size, args.ptuning_num_tokens, args.ptuning_hidden_size) == (1e-4, 10, 32, 30, 128)
    assert (args.warmup_ratio, args.weight_decay, args.max_grad_norm) == (0.1, 0.001, 0.3)


def test_inference_reproduces_spul_and_no_prompt_is_the_qlora_model(runs, data_args, tmp_path):
    with_prompt = evaluate(runs / "spul", tmp_path / "e_spul", data_args)
    assert with_prompt == read(runs / "spul" / "metrics.json")  # reloaded prompt: same predictions
    no_prompt = evaluate(runs / "spul", tmp_path / "e_noprompt", data_args, "--no_prompt")
    assert no_prompt == evaluate(runs / "qlora", tmp_path / "e_qlora", data_args)
    assert read(tmp_path / "e_noprompt" / "manifest.json")["prompt_used"] is False
    assert read(tmp_path / "e_spul" / "manifest.json")["evaluated"]["kind"] == "spul"


def test_mismatched_manifest_is_refused_unless_forced(runs, data_args, tmp_path, capsys):
    # the QLoRA run the prompt points to has changed since the prompt was trained
    qlora_copy, spul_copy = tmp_path / "qlora", tmp_path / "spul"
    shutil.copytree(runs / "qlora", qlora_copy)
    shutil.copytree(runs / "spul", spul_copy)
    adapter = qlora_copy / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(adapter))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(adapter))
    manifest = read(spul_copy / "manifest.json")
    manifest["qlora_run"] = str(qlora_copy)
    (spul_copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "eval"
    err = refused(capsys, inference_spul.main, ["--model_checkpoints", str(spul_copy), "--output_path", str(out)] + data_args)
    assert "QLoRA adapter" in err and "--force" in err and "--model_checkpoints" in err
    assert not out.exists()
    evaluate(spul_copy, out, data_args, "--force")
    assert read(out / "manifest.json")["forced_mismatches"]

    # a prompt recorded for other base weights
    manifest = read(runs / "spul" / "manifest.json")
    manifest["base_weights_sha256"] = "0" * 64
    (spul_copy / "manifest.json").write_text(json.dumps(manifest))
    err = refused(capsys, inference_spul.main, ["--model_checkpoints", str(spul_copy), "--output_path", str(tmp_path / "e2")] + data_args)
    assert "base model weights" in err and not (tmp_path / "e2").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--alpha", "-1"], "--alpha"),
    (["--beta", "-0.5"], "--beta"),
    (["--ptuning_num_tokens", "0"], "--ptuning_num_tokens"),
    (["--ptuning_hidden_size", "0"], "--ptuning_hidden_size"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio"),
    (["--lr", "0"], "--lr"),
    (["--forget_size", "0"], "--forget_size"),
    (["--model_checkpoints", "/nonexistent/run"], "--model_checkpoints"),
    (["--resume_from", "/nonexistent/run"], "--resume_from"),
    (["--generic_label", "positive"], "--generic_label positive"),
    (["--restarts", "-1"], "--restarts"),
    (["--restart_val_forget", "101"], "--restart_val_forget"),
    (["--restarts", "1", "--resume_from", "/nonexistent/run"], "--restarts 1"),
])
def test_spul_bad_input_one_line(extra, flag, capsys, tmp_path):
    out = tmp_path / "out"
    err = refused(capsys, spul.main, extra + ["--output_path", str(out)])
    assert flag in err and not out.exists()


def test_spul_refuses_wrong_kind_existing_output_and_conflicting_model(runs, tiny_model_dir, data_args, tmp_path, capsys):
    err = refused(capsys, spul.main, ["--model_checkpoints", str(runs / "spul"), "--output_path", str(tmp_path / "x")])
    assert "'spul' run, expected qlora" in err
    err = refused(capsys, spul.main, ["--model_checkpoints", str(runs / "qlora"), "--output_path", str(runs / "spul")])
    assert "--output_path" in err and "--overwrite" in err
    other = save_tiny_model(tmp_path / "other_base", seed=1)
    err = refused(capsys, spul.main, ["--model_checkpoints", str(runs / "qlora"), "--model_name", other,
                                      "--output_path", str(tmp_path / "y")] + data_args)
    assert "--model_name" in err and not (tmp_path / "y").exists()


def test_spul_on_pretrained_model_and_resume(runs, tiny_model_dir, data_args, tmp_path, capsys):
    out = tmp_path / "spul_vanilla"
    spul.main(["--model_name", tiny_model_dir, "--beta", "0", "--output_path", str(out)] + SPUL_ARGS + data_args)
    m = read(out / "manifest.json")
    assert m["source_kind"] == "vanilla" and m["qlora_run"] is None and m["qlora_adapter_sha256"] is None
    assert read(out / "train_stats.json")["kl_reference"]["steps_with_reference"] == 0  # beta 0: no reference
    assert evaluate(out, tmp_path / "e", data_args) == read(out / "metrics.json")
    # a prompt trained on the QLoRA model cannot silently seed one on the pre-trained model
    err = refused(capsys, spul.main, ["--model_name", tiny_model_dir, "--resume_from", str(runs / "spul"),
                                      "--output_path", str(tmp_path / "r")] + SPUL_ARGS + data_args)
    assert "--resume_from" in err and "qlora_adapter_sha256" in err and not (tmp_path / "r").exists()
    # nor one trained without a hard prefix seed one behind a prefix
    err = refused(capsys, spul.main, ["--model_name", tiny_model_dir, "--resume_from", str(out), "--hard_prefix", "instruction",
                                      "--forget_names", "Ann Other", "--output_path", str(tmp_path / "r")] + SPUL_ARGS + data_args)
    assert "--resume_from" in err and "--hard_prefix none" in err and not (tmp_path / "r").exists()
    # resuming from a matching run starts from its encoder: lr ~0 keeps the prompt where it was
    spul.main(["--model_name", tiny_model_dir, "--resume_from", str(out), "--output_path", str(tmp_path / "resumed")]
              + SPUL_ARGS + ["--lr", "1e-12", "--num_epochs", "0.3"] + data_args)
    a = load_file(str(out / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "resumed" / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.allclose(a, b, atol=1e-6)
    assert read(tmp_path / "resumed" / "manifest.json")["resumed_from"] == str(out.resolve())


def test_same_command_same_threads_gives_bit_identical_metrics(runs, data_args, tmp_path):
    """Reproducibility: a repeated SPUL run (same flags, same --threads) writes byte-for-byte the
    same metrics.json, the thread count is recorded in config.json and the manifest, and the
    token-norm prompt keeps every prompt row at the model's mean token-embedding norm."""
    argv = ["--model_checkpoints", str(runs / "qlora"), "--threads", "1", "--prompt_norm", "token"] + SPUL_ARGS + data_args
    spul.main(argv + ["--output_path", str(tmp_path / "a")])
    spul.main(argv + ["--output_path", str(tmp_path / "b")])
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert read(tmp_path / "a" / "config.json")["threads"] == 1
    manifest = read(tmp_path / "a" / "manifest.json")
    assert manifest["threads"] == 1 and manifest["data_seed"] == 0
    assert manifest["blas"] == strict_blas()  # MKL's mode (utils.invariant), recorded beside the thread count
    prompt = load_file(tmp_path / "a" / "prompt" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.allclose(prompt.norm(dim=-1), torch.full((prompt.size(0),), manifest["prompt"]["row_norm"]), rtol=1e-4)
    assert set(read(tmp_path / "a" / "metrics.json")) == {"train_retain", "train_forget", "val_retain", "val_forget",
                                                           "test_retain", "test_forget"}


def test_one_and_two_threads_give_the_same_run(runs, data_args, tmp_path):
    """The thread count is recorded, but the result does not depend on it: --threads 1 and
    --threads 2 write byte-identical metrics and prompt weights (utils.invariant)."""
    argv = ["--model_checkpoints", str(runs / "qlora"), "--beta", "2"] + SPUL_ARGS + data_args
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            spul.main(argv + ["--threads", str(n), "--output_path", str(tmp_path / f"t{n}")])
    finally:
        torch.set_num_threads(before)
    assert read(tmp_path / "t2" / "config.json")["threads"] == 2
    for name in ("metrics.json", "prompt/adapter_model.safetensors"):
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t2" / name).read_bytes(), name


def test_validation_splits_are_the_same_for_every_stage_and_never_trained_on(runs):
    """qlora.py and spul.py (same data flags, same --data_seed) hold the same val_retain and
    val_forget, recorded in their manifests, and those rows are in no training split."""
    q, s = read(runs / "qlora" / "manifest.json"), read(runs / "spul" / "manifest.json")
    for split in ("val_retain", "val_forget"):
        assert q["splits"][split] == s["splits"][split] and q["splits"][split]["rows"] == 12
    for split in ("train_retain", "train_forget"):
        assert q["splits"][split]["sha256"] != q["splits"]["val_" + split.split("_")[1]]["sha256"]


def test_generic_label_trains_every_forget_sample_toward_it(runs, data_args, tmp_path, monkeypatch):
    """--generic_label unknown: every forget sample's target is 'unknown' (the default draws
    neutral/unknown per sample), and the manifest counts say so."""
    seen = []
    real = spul.training_set
    monkeypatch.setattr(spul, "training_set", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    out = tmp_path / "g"
    spul.main(["--model_checkpoints", str(runs / "qlora"), "--generic_label", "unknown", "--num_epochs", "0.3",
               "--output_path", str(out)] + SPUL_ARGS + data_args)
    from utils.models import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    forget = [f for f in seen[0] if f["is_forget"]]
    words = {tok.decode([t for t in f["label_ids"] if t != -100]).strip() for f in forget}
    assert words == {"unknown"} and len(forget) > 0
    assert read(out / "manifest.json")["generic_label_counts"] == {"unknown": len(forget)}
    assert read(out / "config.json")["generic_label"] == "unknown"


def test_spul_passes_its_epoch_means_to_the_fit_note(runs, data_args, tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(spul, "forget_fit_note", lambda means, k: seen.append((means, k)) or "note: sentinel")
    capsys.readouterr()
    spul.main(["--model_checkpoints", str(runs / "qlora"), "--output_path", str(tmp_path / "s"), "--generic_label", "unknown"]
              + SPUL_ARGS + data_args)
    assert "note: sentinel" in capsys.readouterr().out
    (means, k), = seen
    assert k == 1 and means == read(tmp_path / "s" / "train_stats.json")["epoch_means"]


def test_guard_that_does_not_fire_leaves_the_run_as_it_was(runs, data_args, tmp_path):
    """--restarts with a bound the first attempt meets: one attempt, and the same metrics.json as
    the unguarded command (the fixture's run); the guard's record is in train_stats.json."""
    out = tmp_path / "g"
    spul.main(["--model_checkpoints", str(runs / "qlora"), "--restarts", "1", "--restart_val_forget", "100",
               "--output_path", str(out)] + SPUL_ARGS + data_args)
    assert (out / "metrics.json").read_bytes() == (runs / "spul" / "metrics.json").read_bytes()
    guard = read(out / "train_stats.json")["guard"]
    first = read(runs / "spul" / "metrics.json")["val_forget"]["accuracy"]
    assert [a["seed"] for a in guard["attempts"]] == [42] and guard["kept_seed"] == 42
    assert guard["attempts"][0]["val_forget_accuracy"] == first
    assert read(out / "manifest.json")["seed"] == 42  # what other stages of seed 42 pair with
    assert "guard" not in read(runs / "spul" / "train_stats.json")


@pytest.mark.parametrize("guard_accs, kept_seed", [
    ((50.0, 0.0, 99.0), 1042),  # attempt 1 above the bound, attempt 2 under it: stop there, keep 1042
    ((60.0, 70.0), 42),  # both above (--restarts 1): keep the lower, the first
])
def test_guard_that_fires_keeps_the_run_of_the_seed_it_chose(runs, data_args, tmp_path, capsys, monkeypatch, guard_accs, kept_seed):
    """The guard's val forget ACCs are set by the test (the tiny model's real ones may be 0 on any
    seed); everything else is real. The run folder is the one the rule picks, byte for byte the
    plain run of that seed (metrics, prompt, encoder): a restart is the same computation as a run
    started with seed + 1000, and the first attempt the same as the unguarded command."""
    accs = iter(guard_accs)
    real = spul.evaluate

    def evaluate(*a, split_names=None, **k):
        ev = real(*a, split_names=split_names, **k)
        if split_names == ["val_forget"]:  # the guard's own evaluation
            ev.metrics["val_forget"]["accuracy"] = next(accs)
        return ev

    monkeypatch.setattr(spul, "evaluate", evaluate)
    restarts = len(guard_accs) - 1
    out = tmp_path / "g"
    capsys.readouterr()
    spul.main(["--model_checkpoints", str(runs / "qlora"), "--restarts", str(restarts), "--output_path", str(out)]
              + SPUL_ARGS + data_args)
    printed = capsys.readouterr().out
    assert "guard: attempt 1 (seed 42): val forget ACC" in printed and "guard: attempt 2 (seed 1042)" in printed
    assert "seed 2042" not in printed  # attempt 2 passed, or there was no third
    guard = read(out / "train_stats.json")["guard"]
    assert [(a["seed"], a["val_forget_accuracy"]) for a in guard["attempts"]] == [(42, guard_accs[0]), (1042, guard_accs[1])]
    assert guard["kept_seed"] == kept_seed and guard["bound"] == 15.0
    if kept_seed == 1042:
        spul.main(["--model_checkpoints", str(runs / "qlora"), "--seed", "1042", "--output_path", str(tmp_path / "plain")]
                  + SPUL_ARGS + data_args)
    plain = tmp_path / "plain" if kept_seed == 1042 else runs / "spul"
    for name in ("metrics.json", "prompt/adapter_model.safetensors", "prompt_encoder.safetensors"):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    assert read(out / "manifest.json")["seed"] == 42  # the run's seed, which other stages of seed 42 pair with


def test_attempt_seeds_and_the_kept_attempt_by_hand():
    assert attempt_seeds(42, 0) == [42] and attempt_seeds(42, 2) == [42, 1042, 2042]
    assert kept_attempt([21.88], 15) == 0  # one attempt: kept whatever it is
    assert kept_attempt([21.88, 9.38], 15) == 1  # the second passes
    assert kept_attempt([9.38, 3.12], 15) == 0  # the first passes: no later attempt counts
    assert kept_attempt([60.94, 21.88], 15) == 1  # neither passes: the lower
    assert kept_attempt([21.88, 21.88, 30.0], 15) == 0  # equals: the earliest
    assert kept_attempt([15.0], 15) == 0 and kept_attempt([15.01, 40.0], 15) == 0  # at the bound passes
    with pytest.raises(ValueError):
        kept_attempt([], 15)
