"""Training cases run both in one process (in pytest) and under ``accelerate launch`` with two
processes (``python tests/dist_worker.py OUT``), by tests/test_distributed.py: tiny models, fixed
step batches chosen so that the forget samples land unevenly on the two ranks (all on one rank,
[F,R | R,R], odd batches, a one-sample batch that leaves rank 1 without samples)."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# forget samples: 0..3; batches by index, as step batches of the loop (batch size 4)
FORGET = {0, 1, 2, 3}
N = 13  # 11 and 12 are not in the batches: 4 steps of 4 per epoch
BATCHES = [
    [0, 4, 1, 5],  # rank 0 gets both forget samples (0, 1), rank 1 only retain (4, 5)
    [2, 6, 7, 8],  # the [F,R,R,R] batch: rank 0 [F,R], rank 1 [R,R]
    [9, 3, 10],  # odd: rank 0 [R,R], rank 1 [F]
    [4],  # one sample: rank 1 runs a zero-weight forward
]


def features():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N):
        ids = torch.randint(5, 60, (5 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "label_ids": ids[-2:] if i % 3 == 0 else ids[-1:], "label": i % 2,
                    "is_forget": i in FORGET, "index": i})
    return out


def fixed_batches(n, batch_size, seed, epoch, *args, **kwargs):
    """The step batches above (cut to the loop's step size), whatever the seed and epoch."""
    flat = [i for b in BATCHES for i in b]
    if batch_size == 4:
        return [list(b) for b in BATCHES]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the (clipped) gradients it is given at each step."""

    grads: list = []

    def step(self, closure=None):
        RecordingAdamW.grads.append([p.grad.detach().clone() if p.grad is not None else None
                                     for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def make_case(name):
    """(model, trainable params, loss_fn) of a case."""
    from peft import get_peft_model

    from utils.baselines import METHODS, NoReference, Weights, make_loss_fn
    from tests.tiny import tiny_llama
    from utils.prompt import add_prompt, prompt_embeddings, trainable_parameters
    from utils.spul_loss import SpulObjective

    if name.startswith("spul"):
        model = add_prompt(tiny_llama(64, seed=0), 3, 8, seed=1)
        for p in model.parameters():
            if not any(p is q for q in trainable_parameters(model)):
                p.requires_grad_(False)
        return model, trainable_parameters(model), SpulObjective(prompt_embeddings, alpha=0.7, beta=0.5)
    if name.startswith("gagd"):
        model = tiny_llama(64, seed=0)  # full fine-tuning: every weight trains
        return model, list(model.parameters()), make_loss_fn(METHODS["gradient_ascent_descent"], NoReference(), Weights(retain=0.8))
    if name.startswith("npo_lora"):
        from utils.baselines import AdapterOffReference
        from utils.models import lora_config

        torch.manual_seed(2)
        model = get_peft_model(tiny_llama(64, seed=0), lora_config(dropout=0.0, target_modules=["q_proj", "v_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, make_loss_fn(METHODS["npo"], AdapterOffReference(), Weights(retain=0.5, npo_beta=0.2))
    raise ValueError(name)


CASES = {  # name: TrainConfig overrides
    "spul": dict(batch_size=4),
    "gagd": dict(batch_size=4),
    "npo_lora": dict(batch_size=4),
    "gagd_accum": dict(batch_size=2, gradient_accumulation_steps=2),  # step batches of 4, as "gagd"
}


def run_case(name):
    """Train one case; returns (stats, {param name: weight}, [grads of each step by param name])."""
    from unittest import mock

    from utils import training

    torch.manual_seed(0)
    model, params, loss_fn = make_case(name)
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = training.TrainConfig(lr=1e-3, num_epochs=1, batch_size=4, warmup_ratio=0.0, max_grad_norm=1e9, seed=0, log_every=1)
    for k, v in CASES[name].items():
        setattr(cfg, k, v)
    RecordingAdamW.grads = []
    with mock.patch.object(training, "epoch_batches", fixed_batches), mock.patch.object(torch.optim, "AdamW", RecordingAdamW):
        stats = training.train(model, params, loss_fn, features(), cfg, "cpu", 0)
    order = [names[id(p)] for p in params]
    grads = [{n: g for n, g in zip(order, step) if g is not None} for step in RecordingAdamW.grads]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return stats, weights, grads


def run_diverging():
    """A loss that is NaN on one rank only (the batch holding sample 5): every rank must stop
    with TrainingDiverged at the same step, none left waiting in a collective. Returns the message."""
    from unittest import mock

    from utils import training

    model, params, loss_fn = make_case("gagd")

    def nan_on_5(m, batch):
        loss, terms = loss_fn(m, batch)
        return (loss * float("nan") if 5 in batch["index"].tolist() else loss), terms

    nan_on_5.global_counts = True
    cfg = training.TrainConfig(lr=1e-3, num_epochs=1, batch_size=4, seed=0)
    with mock.patch.object(training, "epoch_batches", fixed_batches):
        try:
            training.train(model, params, nan_on_5, features(), cfg, "cpu", 0)
        except training.TrainingDiverged as e:
            return str(e)
    return None


def main(out):
    from safetensors.torch import save_file

    from utils import distributed

    out = Path(out)
    rank = distributed.rank()
    for name in CASES:
        stats, weights, grads = run_case(name)
        tensors = {f"w.{k}": v.contiguous() for k, v in weights.items()}
        tensors.update({f"g{s}.{k}": v.contiguous() for s, step in enumerate(grads) for k, v in step.items()})
        save_file(tensors, str(out / f"{name}.rank{rank}.safetensors"))
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(stats.as_dict()))
    (out / f"diverged.rank{rank}.txt").write_text(str(run_diverging()))
    distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
