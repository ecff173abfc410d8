#!/usr/bin/env python
"""Unlearn by fine-tuning (the paper's baselines, plus NPO): start from the merged QLoRA model
(--model_checkpoints QLORA_RUN) or a pre-trained model (--model_name), fine-tune it with the
chosen --unlearn_method for 1 epoch (full fine-tuning; --lora trains a fresh LoRA adapter
instead), evaluate on the four splits and save the unlearned weights (or adapter), tokenizer,
config, metrics, train stats and a manifest into one run folder, which inference_spul.py
--model_checkpoints reads back."""
from __future__ import annotations

import sys
from pathlib import Path

from utils import cli, distributed
from utils.baselines import (
    METHODS,
    AdapterOffReference,
    NoReference,
    Weights,
    build_reference_store,
    make_loss_fn,
    methods_help,
    nonfinite_parameters,
    save_unlearned,
    select_features,
)
from utils.checkpoints import load_pretrained, load_run
from utils.data import prepare_splits, split_fingerprint, training_set
from utils.evaluation import evaluate_splits, format_table
from utils.models import lora_config, lora_target_modules, select_device, set_pad_token_id
from utils.runs import atomic_run_dir, check_output, default_run_name, read_manifest, run_manifest, save_run
from utils.template import GENERIC_LABELS, LABEL_WORDS, Encoder
from utils.training import TrainConfig, TrainingDiverged, seed_everything, train


def build_parser():
    p = cli.parser(__doc__)
    g = p.add_argument_group("unlearning")
    g.add_argument("--unlearn_method", required=True, choices=list(METHODS), metavar="METHOD",
                   help=f"one of: {methods_help()}")
    g.add_argument("--retain_weight", type=float, default=None,
                   help="weight w of the retain term (the KL of gradient_ascent_kl, the retain CE of "
                        "gradient_ascent_descent and npo); default 1 for GA+KL and GA+GD, 0 for npo; "
                        "0 drops the term and the retain set; not for gradient_ascent/random_label")
    g.add_argument("--npo_beta", type=float, default=0.1, help="NPO's beta (inverse temperature; > 0)")
    g.add_argument("--kl_topk", type=int, default=64,
                   help="GA+KL under full fine-tuning: the cached reference keeps the top-k log-probs per "
                        "label position plus the tail mass (KL between the (k+1)-cell distributions, a lower "
                        "bound of the full KL); 0 keeps the full-vocabulary distribution (exact, V*4 bytes per "
                        "retain sample)")
    g.add_argument("--lora", action="store_true",
                   help="unlearn through a fresh LoRA adapter on the merged model instead of full "
                        "fine-tuning; the reference is then the model with the adapter disabled (exact, no cache)")
    g.add_argument("--lora_rank", type=int, default=16, help="LoRA rank with --lora")
    g.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha with --lora")
    g.add_argument("--lora_dropout", type=float, default=0.1, help="LoRA dropout with --lora")
    m = p.add_argument_group("starting model")
    m.add_argument("--model_checkpoints", default=None,
                   help="a qlora.py run folder: the base model with its QLoRA adapter merged (the paper's setting); "
                        "without it, --model_name is unlearned directly")
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_train_args(p, lr=1e-5, epochs=1, warmup=0.05)
    cli.add_output_args(p)
    return p


def check_args(args) -> float:
    """Flag checks that need no model or data; returns the retain weight in force."""
    cli.check_common(args)
    method = METHODS[args.unlearn_method]
    if args.retain_weight is not None and method.retain_term is None:
        raise cli.UsageError(f"--retain_weight: {args.unlearn_method} has no retain or KL term")
    weight = method.default_weight if args.retain_weight is None else args.retain_weight
    if weight < 0:
        raise cli.UsageError(f"--retain_weight {weight}: must be >= 0")
    if args.npo_beta <= 0:
        raise cli.UsageError(f"--npo_beta {args.npo_beta}: must be positive")
    if args.kl_topk < 0:
        raise cli.UsageError(f"--kl_topk {args.kl_topk}: must be >= 0")
    if args.lora_rank < 1 or not 0 <= args.lora_dropout < 1:
        raise cli.UsageError("--lora_rank must be >= 1 and --lora_dropout in [0, 1)")
    return weight


def default_output(args) -> Path:
    start = Path(str(args.model_checkpoints).rstrip("/")).name if args.model_checkpoints else default_run_name(Path(args.model_name).name, args.dataset)
    return Path("runs") / default_run_name(start, args.unlearn_method + ("-lora" if args.lora else ""))


def warn_if_other_data(qlora_manifest: dict, splits_fp: dict) -> None:
    """The QLoRA run should have memorised the forget set being unlearned."""
    theirs = qlora_manifest.get("splits", {}).get("train_forget", {}).get("sha256")
    if theirs and theirs != splits_fp["train_forget"]["sha256"]:
        print("warning: train_forget differs from the one the QLoRA run was trained on "
              "(other --dataset, --forget_size, caps or --seed)", file=sys.stderr)


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    weight = check_args(args)
    method = METHODS[args.unlearn_method]
    out = Path(args.output_path or default_output(args))
    check_output(out, args.overwrite)
    qlora_manifest = read_manifest(Path(args.model_checkpoints), kinds=("qlora",)) if args.model_checkpoints else None
    seed_everything(args.seed)
    splits = prepare_splits(args)
    cli.check_tokenizer(args)  # --max_length, before any model is loaded
    ckpt = cli.check_resume(args, out, splits)

    device = select_device()
    loaded = load_run(args.model_checkpoints, device, kinds=("qlora",)) if args.model_checkpoints else load_pretrained(args.model_name, device, args.set_pad_id)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.set_pad_id:
        tokenizer.pad_token = tokenizer.eos_token
    set_pad_token_id(model, tokenizer.pad_token_id)
    if qlora_manifest is not None:
        args.model_name = qlora_manifest["base_model"]  # the run's base, recorded in the manifest
        warn_if_other_data(qlora_manifest, split_fingerprint(splits))
    encoder = Encoder(tokenizer, args.max_length)
    cli.check_max_length(encoder, LABEL_WORDS + GENERIC_LABELS)

    features = select_features(method, training_set(encoder, splits, args.seed, relabel_forget=method.relabel_forget), weight)
    weights = Weights(retain=weight, npo_beta=args.npo_beta)
    needs_reference = method.ref_logprob or (method.ref_dist and weight > 0)
    if args.lora:
        from peft import get_peft_model

        lora = lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, target_modules=lora_target_modules(model))
        model = get_peft_model(model, lora)
        reference = AdapterOffReference() if needs_reference else NoReference()
    else:
        model.requires_grad_(True)  # a merged PEFT model comes back frozen
        reference = build_reference_store(model, method, features, args.eval_batch_size, device, tokenizer.pad_token_id,
                                          args.kl_topk, weight) if needs_reference else NoReference()
    params = [p for p in model.parameters() if p.requires_grad]
    if distributed.is_main():
        print(f"device {device}, method {args.unlearn_method}, {'LoRA' if args.lora else 'full fine-tuning'}, "
              f"{len(features)} training samples, trainable parameters {sum(p.numel() for p in params):,}, "
              f"reference {reference.stats}")

    cfg = TrainConfig(args.lr, args.num_epochs, args.train_batch_size, args.weight_decay, args.warmup_ratio,
                      args.max_grad_norm, args.seed, log_every=1, **ckpt)
    try:
        stats = train(model, params, make_loss_fn(method, reference, weights), features, cfg, device,
                      tokenizer.pad_token_id, desc=args.unlearn_method)
        bad = nonfinite_parameters((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if bad:
            raise TrainingDiverged(f"non-finite weights after training ({bad[0]}, {len(bad)} tensors)")
    except TrainingDiverged as e:
        print(f"error: {args.unlearn_method} diverged: {e}; nothing saved (try a lower --lr than {args.lr:g})", file=sys.stderr)
        sys.exit(1)
    metrics = evaluate_splits(model, encoder, splits, args.eval_batch_size, device)

    if distributed.is_main():  # one run folder, whatever the number of processes
        with atomic_run_dir(out, args.overwrite) as tmp:
            saved = save_unlearned(tmp, model, args.lora, args.model_checkpoints)
            tokenizer.save_pretrained(tmp / "tokenizer")
            manifest = run_manifest(
                "baseline", args, loaded.model_path, splits,
                method=args.unlearn_method,
                loss_weights={"retain": weight if method.retain_term else None, "retain_term": method.retain_term,
                              "npo_beta": args.npo_beta if method.ref_logprob else None},
                lora=args.lora,
                qlora_run=str(args.model_checkpoints) if args.model_checkpoints else None,
                qlora_adapter_sha256=qlora_manifest.get("adapter_sha256") if qlora_manifest else None,
                qlora_base_weights_sha256=qlora_manifest.get("base_weights_sha256") if qlora_manifest else None,
                reference={k: v for k, v in reference.stats.items() if k != "seconds"},
                saved=saved,
            )
            save_run(tmp, args, metrics, manifest, {**stats.as_dict(), "reference": reference.stats, "training_samples": len(features)})
        cli.remove_checkpoints(out)
        print(format_table({args.unlearn_method: metrics}))
        print(f"run folder: {out}")
    distributed.barrier()


if __name__ == "__main__":
    main()
