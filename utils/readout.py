"""Where can the frozen model tell a forget text from a look-alike? A diagnostic for entity
forget sets (the embedded ``rt``, the paper's SST-2): linear read-out probes on the hidden states
of a qlora.py run, without any prompt.

SPUL changes what the model answers at the position that predicts the label, through a prefix
that the text attends to but that cannot attend to the text. If "names one of the forgotten
people" is hard to read at that position, a prompt has to make the model move it there first.
This tool measures, per layer, how well a logistic-regression probe trained on the train splits
separates, on the validation splits (never test: they are dropped when the data is loaded):

- ``forget_vs_retain``: forget texts from retain texts (mostly "names someone" vs "names no one");
- ``forget_vs_swapped``: forget texts from the same texts with every forgotten name swapped for a
  made-up name (``utils.augment.counterfactual_retain``): only the identity of the name differs;
- ``swapped_vs_retain``: the control, "names a made-up person" vs retain;

each at the label-predicting position (``label``) and, for ``forget_vs_swapped``, mean-pooled over
all text positions (``pooled``: what the sequence holds anywhere). The score is the probe's ROC
AUC on validation; 0.5 is chance.

``--prefix instruction`` puts the instruction_prompt guardrail's text (``utils.guardrails``: it
names the forgotten people) before every example, as that baseline does: does a prefix that
spells out the names make "names a forgotten person" readable at the label position?

    python -m utils.readout runs/main/qlora-s42 --dataset rt <the run's data flags> --output_path runs/readout-s42
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import cli
from utils.augment import counterfactual_retain, forgotten_names
from utils.data import VAL_SPLITS, encode_frame, prepare_splits
from utils.forward import to_device
from utils.guardrails import HARD_PREFIXES, hard_prefix_text, prefix_ids
from utils.kinds import load_checked
from utils.models import select_device
from utils.runs import atomic_run_dir, check_output, write_json
from utils.template import Encoder, collate

SIDES = ("train", "val")
CONTRASTS = {  # name: (positive set, negative set); sets: retain, forget, swapped
    "forget_vs_retain": ("forget", "retain"),
    "forget_vs_swapped": ("forget", "swapped"),
    "swapped_vs_retain": ("swapped", "retain"),
}


def probe_auc(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, c: float = 0.1) -> float:
    """ROC AUC on (x_val, y_val) of an L2 logistic regression (inverse strength ``c``, balanced
    classes) fit on (x_train, y_train), features standardised with the train mean and std."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit((x_train - mu) / sd, y_train)
    return float(roc_auc_score(y_val, clf.decision_function((x_val - mu) / sd)))


def hidden_states(model, features: list[dict], pad_id: int, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(N, layers + 1, d) hidden states at each example's label-predicting position, and the same
    mean-pooled over its text positions (padding excluded); embeddings are layer 0."""
    at_label, pooled = [], []
    for i in tqdm(range(0, len(features), batch_size), desc="read-out", unit="batch", leave=False):
        batch = to_device(collate(features[i : i + batch_size], pad_id), device)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h = torch.stack(out.hidden_states, 1).float()  # (B, layers + 1, L, d)
        rows = torch.arange(h.size(0), device=h.device)
        at_label.append(h[rows, :, batch["label_pos"][:, 0]].cpu().numpy())
        mask = batch["attention_mask"].to(h.dtype)[:, None, :, None]
        pooled.append(((h * mask).sum(2) / mask.sum(2)).cpu().numpy())
    return np.concatenate(at_label), np.concatenate(pooled)


def with_prefix(features: list[dict], ids: list[int]) -> list[dict]:
    """The features with the token ids ``ids`` in front (``collate`` finds the label positions
    from the lengths, so they move with the text)."""
    return [{**f, "input_ids": list(ids) + list(f["input_ids"])} for f in features]


def readout(states: dict, c: float = 0.1) -> dict:
    """``states[side][set] = (at_label, pooled)`` for side in train/val and set in
    retain/forget/swapped. Returns {contrast: {"label": [AUC per layer], "pooled": [...]}}."""
    out = {}
    for name, (pos, neg) in CONTRASTS.items():
        kinds = ("label", "pooled") if name == "forget_vs_swapped" else ("label",)
        out[name] = {}
        for k, kind in enumerate(kinds):
            def xy(side):
                p, n = states[side][pos][k], states[side][neg][k]
                return np.concatenate([p, n]), np.r_[np.ones(len(p)), np.zeros(len(n))]
            (xt, yt), (xv, yv) = xy("train"), xy("val")
            out[name][kind] = [probe_auc(xt[:, layer], yt, xv[:, layer], yv, c) for layer in range(xt.shape[1])]
    return out


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="a qlora.py run folder (its merged model is probed, no prompt)")
    cli.add_data_args(p)
    p.set_defaults(eval_splits=["train_retain", "train_forget", *VAL_SPLITS])  # test is never read
    p.add_argument("--forget_names", nargs="+", metavar="NAME", default=None, help="the forgotten names (default: those the split folder's manifest records, e.g. the embedded rt)")
    p.add_argument("--prefix", default="none", choices=HARD_PREFIXES, help="none: the examples alone; instruction: the instruction_prompt baseline's text (naming the forgotten people) before each example")
    p.add_argument("--probe_c", type=float, default=0.1, help="inverse L2 strength of the logistic-regression probes")
    p.add_argument("--eval_batch_size", type=int, default=16, help="examples per forward")
    p.add_argument("--force", action="store_true", help="load a run whose recorded hashes do not match its files")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", required=True, help="folder for readout.json (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def markdown(result: dict) -> str:
    layers = len(result["forget_vs_retain"]["label"])
    cols = [("forget_vs_retain", "label"), ("forget_vs_swapped", "label"), ("swapped_vs_retain", "label"), ("forget_vs_swapped", "pooled")]
    lines = ["| layer | " + " | ".join(f"{c} ({k})" for c, k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for layer in range(layers):
        lines.append(f"| {layer} | " + " | ".join(f"{result[c][k][layer]:.3f}" for c, k in cols) + " |")
    return "\n".join(lines)


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_common(args)
    if not args.probe_c > 0:
        raise cli.UsageError(f"--probe_c {args.probe_c}: must be positive")
    if any(s.startswith("test") for s in args.eval_splits):
        raise cli.UsageError("--eval_splits: the read-out reads train and validation splits only")
    check_output(Path(args.output_path), args.overwrite)
    data = cli.data_config(args)
    splits = prepare_splits(data)
    if not all(s in splits for s in VAL_SPLITS):
        raise cli.UsageError("--val_fraction/--max_val_*: the read-out needs validation splits")
    names = forgotten_names(args.forget_names, data)
    frames = {side: {"retain": splits[f"{side}_retain"], "forget": splits[f"{side}_forget"],
                     "swapped": counterfactual_retain(splits[f"{side}_forget"], names, args.seed)} for side in SIDES}
    text = hard_prefix_text(args.prefix, args.forget_names, data, splits, f"--prefix {args.prefix}")
    device = select_device()
    source, _ = load_checked(args.run, device, args.force, flag="RUN", kinds=("qlora",))
    model = source.model.eval()
    encoder = Encoder(source.tokenizer, args.max_length, task=data.task)
    pad = source.tokenizer.pad_token_id
    front = prefix_ids(source.tokenizer, text) if text else []
    states = {side: {k: hidden_states(model, with_prefix(encode_frame(encoder, df, False), front), pad, args.eval_batch_size, device)
                     for k, df in sets.items()} for side, sets in frames.items()}
    result = readout(states, args.probe_c)
    sizes = {side: {k: len(df) for k, df in sets.items()} for side, sets in frames.items()}
    with atomic_run_dir(args.output_path, args.overwrite) as tmp:
        write_json(tmp / "readout.json", {"run": str(args.run), "sizes": sizes, "probe_c": args.probe_c,
                                          "prefix": args.prefix, "prefix_tokens": len(front),
                                          "seed": args.seed, "threads": args.threads, "auc": result})
    print(markdown(result))
    print(f"output: {args.output_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
