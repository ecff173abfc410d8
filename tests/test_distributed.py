"""Several processes on CPU (gloo): spul.py and inference_spul.py under
``accelerate launch --multi_gpu --num_processes 2`` write one run folder, evaluate every example
exactly once, and give the same metrics as one process; the training loop averages gradients
over the ranks (every rank ends with the same weights, equal to one process on the whole batch).

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
from utils.models import save_tiny_model, tiny_tokenizer_vocab

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


# --- the training loop's gradient averaging, with two forked ranks (no interpreter start-up) ---

def make_model():
    """A tiny LoRA model without dropout (dropout masks depend on how a batch is split)."""
    from peft import get_peft_model

    from utils.models import lora_config, tiny_llama

    torch.manual_seed(1)
    return get_peft_model(tiny_llama(64, seed=0), lora_config(dropout=0.0, target_modules=["q_proj", "v_proj"]))


def _rank_main(rank, world, port, out_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from tests.test_training import features, loss_fn
    from utils.training import TrainConfig, train

    model = make_model()
    if rank == 1:  # a different start: the broadcast from rank 0 must overwrite it
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    stats = train(model, model.parameters(), loss_fn, features(), TrainConfig(lr=1e-2, num_epochs=1, batch_size=5, seed=3), "cpu", 0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(Path(out_dir) / f"rank{rank}.safetensors"))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"steps": stats.steps, "processes": stats.processes,
                                                                "tokens": stats.train_tokens}))
    distributed._shutdown()


def test_training_averages_gradients_over_ranks(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tests.test_training import features, loss_fn
    from utils.training import TrainConfig, train

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert k not in os.environ
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork", join=True)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # synchronised: every rank holds the same weights
    info = read(tmp_path / "rank0.json")
    assert info["processes"] == 2 and info["steps"] == 4  # 20 examples, global batch 5 (shards of 3 and 2)

    # one process on the whole global batches: the same weights (mean CE = example-weighted shard means)
    model = make_model()
    stats = train(model, model.parameters(), loss_fn, features(), TrainConfig(lr=1e-2, num_epochs=1, batch_size=5, seed=3), "cpu", 0)
    one = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert info["tokens"] == stats.train_tokens
    assert all(torch.allclose(one[k], r0[k], atol=1e-5, rtol=1e-4) for k in one)
    start = {n: p.detach() for n, p in make_model().named_parameters() if p.requires_grad}
    assert not all(torch.allclose(start[k], r0[k], atol=1e-5) for k in start)  # it did train


def test_merge_by_index_drops_padding_duplicates_and_refuses_gaps():
    # what a padded DistributedSampler would hand back: index 0 twice
    parts = [([0, 2, 4], ["a", "c", "e"]), ([1, 3, 0], ["b", "d", "a2"])]
    assert distributed.merge_by_index(parts, 5) == ["a", "b", "c", "d", "e"]
    with pytest.raises(RuntimeError, match="lost 1 of 5"):
        distributed.merge_by_index([([0, 1, 2], list("abc")), ([4], ["e"])], 5)
