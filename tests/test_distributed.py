"""Several processes on CPU (gloo): spul.py and inference_spul.py under
``accelerate launch --multi_gpu --num_processes 2`` write one run folder, evaluate every example
exactly once, and give the same metrics as one process; the training loop (accelerate, DDP) gives
the losses, gradients and weights of one process on the whole batch (tests/dist_worker.py),
however the forget samples fall on the ranks; gradient accumulation equals one larger batch.

Note: ``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up
(``--mpirun_hostfile``); ``--multi_gpu`` is the launcher mode that starts N processes, and on a
machine without GPUs they run on CPU with gloo."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference_spul
from tests.conftest import write_splits
from utils import distributed
from tests.tiny import save_tiny_model, tiny_tokenizer_vocab

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           script, *[str(a) for a in args]]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def read(path):
    return json.loads(Path(path).read_text())


def decisive_model(folder, data):
    """A tiny random Llama that classifies: its output rows for "positive" and "negative" are
    set to ``a*u + b*v`` and ``a*u - b*v``, with ``u`` the mean direction of its hidden states at
    the label-predicting position over ``data`` and ``v`` their main direction of variation, so
    that its argmax over the whole vocabulary is a label word and varies with the input."""
    import pandas as pd
    from safetensors.torch import load_file, save_file

    from utils.forward import label_hidden
    from utils.models import load_model, load_tokenizer
    from utils.template import Encoder, collate

    save_tiny_model(folder, seed=3)
    model, _ = load_model(str(folder), "cpu")
    encoder = Encoder(load_tokenizer(str(folder)), 64)
    texts = [t for f in sorted(Path(data).glob("*.csv")) for t in pd.read_csv(f)["text"]]
    feats = [dict(zip(("input_ids", "label_ids"), encoder.encode(t, "positive")), label=1) for t in texts]
    with torch.no_grad():
        h = label_hidden(model, collate(feats, 0))[:, 0]
    mean = h.mean(0)
    u = mean / mean.norm()
    v = torch.linalg.svd(h - mean, full_matrices=False).Vh[0]
    v = v - (v @ u) * u
    v = v / v.norm()
    a, b = 10 / mean.norm(), 10 / ((h - mean) @ v).std()
    weights = load_file(str(folder / "model.safetensors"))
    vocab = tiny_tokenizer_vocab()
    weights["lm_head.weight"][vocab["positive"]] = a * u + b * v
    weights["lm_head.weight"][vocab["negative"]] = a * u - b * v
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_spul_and_inference_under_accelerate_launch_with_two_processes(tmp_path):
    data = write_splits(tmp_path / "data", rows=10)
    model = decisive_model(tmp_path / "model", data)  # eval batches of 4: 4, 4, 2 -> ranks get 2 and 1 batches
    runs = tmp_path / "runs"
    common = ["--data_dir", data, "--max_length", "64", "--eval_batch_size", "4", "--val_fraction", "0"]  # 10 rows each
    launch("spul.py", "--model_name", model, "--output_path", runs / "spul", "--num_epochs", "1", "--train_batch_size", "4",
           "--lr", "1e-2", "--ptuning_num_tokens", "3", "--ptuning_hidden_size", "8", "--save_every", "2", *common)
    assert sorted(p.name for p in runs.iterdir()) == ["spul"]  # one run folder; no temporary or checkpoint folder
    stats = read(runs / "spul" / "train_stats.json")
    assert stats["processes"] == 2 and stats["steps"] == 5  # 20 examples, global batch 4

    launch("inference_spul.py", "--model_checkpoints", runs / "spul", "--output_path", runs / "eval2", *common)
    inference_spul.main([str(a) for a in ["--model_checkpoints", runs / "spul", "--output_path", runs / "eval1", *common]])
    assert sorted(p.name for p in runs.iterdir()) == ["eval1", "eval2", "spul"]
    two, one, trained = read(runs / "eval2" / "metrics.json"), read(runs / "eval1" / "metrics.json"), read(runs / "spul" / "metrics.json")
    for split, m in two.items():  # every example counted exactly once
        assert m["n"] == 10 and sum(m["predictions"].values()) == 10, (split, m)
    assert two == one == trained  # 2-process evaluation == 1-process evaluation, exactly
    assert any(m["predictions"]["negative"] + m["predictions"]["positive"] > 0 for m in one.values())  # not a trivial match
    assert read(runs / "eval2" / "manifest.json")["evaluated"]["kind"] == "spul"


# --- exact losses, gradients and weights: two processes == one process -------------------------

def test_two_processes_give_one_process_losses_gradients_and_weights(tmp_path):
    """SPUL (L_f, L_r, L_kl), GA+GD (full fine-tuning), NPO+RT (LoRA, adapter-off reference) and
    GA+GD with 2 accumulation steps, on step batches that put all forget samples on one rank,
    [F,R | R,R], an odd batch, and a one-sample batch (rank 1 idle): the same logged loss and
    terms, the same gradient at every step and the same trained weights as one process (to the
    float rounding that AdamW can amplify; see below)."""
    from safetensors.torch import load_file

    from tests import dist_worker

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert k not in os.environ
    launch("tests/dist_worker.py", tmp_path)
    for name in dist_worker.CASES:
        stats, weights, grads = dist_worker.run_case(name)  # one process, same batches
        two = read(tmp_path / f"{name}.json")
        r0 = load_file(str(tmp_path / f"{name}.rank0.safetensors"))
        r1 = load_file(str(tmp_path / f"{name}.rank1.safetensors"))
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), name  # every rank: same weights
        assert two["processes"] == 2 and stats.processes == 1 and two["steps"] == stats.steps == 4, name
        assert two["train_tokens"] == stats.train_tokens, name
        for (s2, l2, t2), (s1, l1, t1) in zip(two["losses"], stats.losses, strict=True):
            assert s2 == s1 and abs(l2 - l1) <= 1e-6, (name, s1, l1, l2)
            assert t2.keys() == t1.keys() and all(abs(t2[k] - t1[k]) <= 1e-6 for k in t1), (name, s1, t1, t2)
        assert len(grads) == 4
        for step, g in enumerate(grads):
            for k, v in g.items():
                assert torch.allclose(r0[f"g{step}.{k}"], v, rtol=0, atol=1e-6), (name, step, k, (r0[f"g{step}.{k}"] - v).abs().max())
        # AdamW divides each gradient by its own running scale, so a component whose gradient
        # nearly cancels (6.56e-8 in one process, 6.48e-8 in two, summed in another order; seen on
        # an AMD EPYC) takes a step of its own size. So: the bulk of every tensor within 1e-6 and
        # nothing past 1e-5, 1% of one step at lr 1e-3 (a rank that skipped a step or a gradient
        # sync would be off by about 1e-3 on most entries).
        for k, v in weights.items():
            d = (r0[f"w.{k}"] - v).abs()
            assert d.max() <= 1e-5 and (d > 1e-6).float().mean() <= 0.01, (name, k, d.max(), int((d > 1e-6).sum()))
    # a NaN loss on rank 1 only: both ranks stop at step 1, as one process would
    for r in (0, 1):
        assert (tmp_path / f"diverged.rank{r}.txt").read_text().startswith("non-finite loss (nan) at step 1"), r
    # the terms that matter were there: forget and retain terms moved, the weights trained
    spul = read(tmp_path / "spul.json")["losses"]
    assert all(t["L_f"] > 0 and t["L_r"] > 0 for _, _, t in spul[:2]) and spul[3][2]["L_f"] == 0.0
    start = dist_worker.make_case("gagd")[0].state_dict()
    r0 = load_file(str(tmp_path / "gagd.rank0.safetensors"))
    assert not torch.allclose(start["model.layers.0.self_attn.q_proj.weight"], r0["w.model.layers.0.self_attn.q_proj.weight"])


def test_gradient_accumulation_equals_one_larger_batch():
    """One process: 2 x batch 4 (accumulated) trains exactly as batch 8, for a loss with forget
    and retain terms (GA+GD) and for SPUL."""
    from unittest import mock

    from tests import dist_worker
    from utils import training

    feats = dist_worker.features()
    batches = lambda n, b, *a, **k: [[0, 4, 5, 6, 1, 7, 8, 9], [2, 3, 10, 11, 12]]  # noqa: E731  (3+5 forget/retain split unevenly over micro-batches)
    for case in ("gagd", "spul"):
        out = []
        for batch_size, accum in ((8, 1), (4, 2)):
            torch.manual_seed(0)
            model, params, loss_fn = dist_worker.make_case(case)
            cfg = training.TrainConfig(lr=1e-3, num_epochs=1, batch_size=batch_size, gradient_accumulation_steps=accum,
                                       warmup_ratio=0.0, seed=0, log_every=1)
            with mock.patch.object(training, "epoch_batches", batches):
                stats = training.train(model, params, loss_fn, feats, cfg, "cpu", 0)
            out.append((stats, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        (big, w8), (acc, w4) = out
        assert big.steps == acc.steps == 2 and acc.gradient_accumulation_steps == 2
        assert all(abs(a[1] - b[1]) <= 1e-6 for a, b in zip(big.losses, acc.losses, strict=True)), case
        assert all(torch.allclose(w8[k], w4[k], rtol=0, atol=1e-6) for k in w8), case


def test_merge_by_index_drops_padding_duplicates_and_refuses_gaps():
    # what a padded DistributedSampler would hand back: index 0 twice
    parts = [([0, 2, 4], ["a", "c", "e"]), ([1, 3, 0], ["b", "d", "a2"])]
    assert distributed.merge_by_index(parts, 5) == ["a", "b", "c", "d", "e"]
    with pytest.raises(RuntimeError, match="lost 1 of 5"):
        distributed.merge_by_index([([0, 1, 2], list("abc")), ([4], ["e"])], 5)


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp_7b_full", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_committed_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "scripts" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).split(".")[-1] == kind
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 1 and config.fsdp_config["fsdp_use_orig_params"] is True
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2 and "gradient_accumulation_steps" not in config.deepspeed_config
