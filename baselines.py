#!/usr/bin/env python
"""Unlearn by fine-tuning (the paper's baselines, plus NPO): start from the merged QLoRA model
(--model_checkpoints QLORA_RUN) or a pre-trained model (--model_name), fine-tune it with the
chosen --unlearn_method for 1 epoch (full fine-tuning; --lora trains a fresh LoRA adapter
instead), evaluate on every split and save the unlearned weights (or adapter), tokenizer,
config, metrics, train stats and a manifest into one run folder, which inference_spul.py
--model_checkpoints reads back. The training-free methods train nothing:
instruction_prompt and in_context place a fixed hard-text prefix before every input of the
starting model and save it (prefix.txt); name_filter answers every input naming a forgotten
person with a generic label without the model. Each evaluates the starting model so and saves a
manifest pointing to it, no weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from utils import cli, distributed, guardrails
from utils.baselines import (
    METHODS,
    AdapterOffReference,
    NoReference,
    build_reference_store,
    hparam_flags,
    make_loss_fn,
    method_weights,
    methods_help,
    nonfinite_parameters,
    save_unlearned,
    select_features,
)
from utils.kinds import load_run
from utils.loading import load_pretrained
from utils.augment import counterfactual_retain, describe_pseudo, forgotten_names, pseudo_labelled
from utils.data import prepare_splits, split_fingerprint, training_set, unused_retain
from utils.evaluation import evaluate, format_table
from utils.guardrails import prefix_embeddings, save_prefix
from utils.models import add_lora, lora_config, lora_target_modules, select_device, set_pad_token_id
from utils.runs import (
    METRICS,
    TOKENIZER_DIR,
    atomic_run_dir,
    check_output,
    default_run_name,
    read_json,
    read_manifest,
    run_manifest,
    save_run,
    warn_if_oracle,
)
from utils.select import READ, attempt_seeds, choose
from utils.template import Encoder
from utils.trackers import open_trackers
from utils.training import TrainConfig, TrainingDiverged, TrainStats, seed_everything, train


def build_parser():
    p = cli.parser(__doc__)
    g = p.add_argument_group("unlearning")
    g.add_argument("--unlearn_method", required=True, choices=list(METHODS), metavar="METHOD",
                   help=f"one of: {methods_help()}")
    g.add_argument("--retain_weight", type=float, default=None,
                   help="weight w of the retain term (the KL of gradient_ascent_kl, the retain CE of "
                        "gradient_ascent_descent and npo); default 1 for GA+KL and GA+GD, 0 for npo; "
                        "0 drops the term and the retain set; not for gradient_ascent/random_label")
    for flag, (spec, users) in hparam_flags().items():  # each method's own hyperparameters (Method.hparams)
        g.add_argument(f"--{flag}", type=float, default=None,
                       help=f"{', '.join(users)}: {spec.help} (default {spec.default:g})")
    cli.add_forget_target_args(g, "the model")  # --generic_label (methods with generic labels), --counterfactual_retain (with a retain set)
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
    t = p.add_argument_group(
        f"training-free methods ({', '.join(n for n, m in METHODS.items() if m.training_free)})",
        "no loss and no training: a fixed hard-text prefix goes before every input of the starting model, or a "
        "filter in front of it (the training flags are unused); the run folder holds the prefix (prefix.txt) or "
        "the filter's names (manifest.json) and points to the model")
    t.add_argument("--forget_names", nargs="+", metavar="NAME", default=None,
                   help="instruction_prompt, name_filter: the forgotten people the instruction names or the filter "
                        "catches; with --counterfactual_retain, the names it swaps out (default: the names recorded by an "
                        "entities-recipe split folder, e.g. the embedded rt)")
    t.add_argument("--icl_forget", type=int, default=None, metavar="K",
                   help=f"in_context: train_forget examples in the context, each with a generic label "
                        f"(default {guardrails.ICL_DEFAULT}; drawn with --seed)")
    t.add_argument("--icl_retain", type=int, default=None, metavar="K",
                   help=f"in_context: class-balanced train_retain examples in the context, with their true labels "
                        f"(default {guardrails.ICL_DEFAULT}; drawn with --seed)")
    t.add_argument("--icl_draws", type=int, default=None, metavar="N",
                   help="in_context: draw the context N times (seeds --seed, --seed + 1000, ...), evaluate each on "
                        "train_forget, val_retain and val_forget, and keep the draw the selection criterion picks "
                        "(python -m utils.select: the lowest mean of train_forget and val_forget ACC among the draws "
                        "within 5 points of the QLoRA run's val_retain); never reads a test split; needs "
                        "--model_checkpoints and validation data (default 1: one draw, with --seed)")
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
    for flag, (spec, users) in hparam_flags().items():
        value = getattr(args, flag)
        if value is not None and flag not in method.hparams:
            raise cli.UsageError(f"--{flag}: only used with --unlearn_method {', '.join(users)}")
        problem = spec.check(flag, value) if value is not None else None
        if problem:
            raise cli.UsageError(problem)
    if args.kl_topk < 0:
        raise cli.UsageError(f"--kl_topk {args.kl_topk}: must be >= 0")
    if args.lora_rank < 1 or not 0 <= args.lora_dropout < 1:
        raise cli.UsageError("--lora_rank must be >= 1 and --lora_dropout in [0, 1)")
    if args.generic_label is not None and not method.relabel_forget:
        users = ", ".join(n for n, m in METHODS.items() if m.relabel_forget)
        raise cli.UsageError(f"--generic_label: only used with --unlearn_method {users} (the methods with generic labels)")
    if method.kl_gate and getattr(args, method.kl_gate) and not method.trains_on_retain(weight):
        raise cli.UsageError(f"--{method.kl_gate}: the KL term is taken on the retain set, which --retain_weight 0 drops")
    for flag in ("counterfactual_retain", "pseudo_retain"):
        if getattr(args, flag) and not method.trains_on_retain(weight):
            raise cli.UsageError(f"--{flag}: {args.unlearn_method} trains on no retain set"
                                 + ("" if method.retain_term is None else " at --retain_weight 0"))
    for flag in METHOD_FLAGS:
        if flag == "forget_names" and args.counterfactual_retain:
            continue  # the names --counterfactual_retain swaps out
        if getattr(args, flag) is not None and flag not in method.flags:
            users = ", ".join(n for n, m in METHODS.items() if flag in m.flags)
            raise cli.UsageError(f"--{flag}: only used with --unlearn_method {users}")
    for flag in ("icl_forget", "icl_retain"):
        if flag in method.flags:
            setattr(args, flag, guardrails.ICL_DEFAULT if getattr(args, flag) is None else getattr(args, flag))
            if getattr(args, flag) < 0:
                raise cli.UsageError(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if "icl_forget" in method.flags and args.icl_forget + args.icl_retain == 0:
        raise cli.UsageError("--icl_forget 0 --icl_retain 0: the context would be empty")
    if "icl_draws" in method.flags:
        args.icl_draws = 1 if args.icl_draws is None else args.icl_draws
        if args.icl_draws < 1:
            raise cli.UsageError(f"--icl_draws {args.icl_draws}: must be >= 1")
        if args.icl_draws > 1 and not args.model_checkpoints:
            raise cli.UsageError(f"--icl_draws {args.icl_draws}: needs --model_checkpoints (its val_retain ACC sets the "
                                 "utility bound of the choice)")
    return weight


METHOD_FLAGS = ("forget_names", "icl_forget", "icl_retain", "icl_draws")  # read only by the methods naming them in Method.flags


def default_output(args) -> Path:
    start = Path(str(args.model_checkpoints).rstrip("/")).name if args.model_checkpoints else default_run_name(Path(args.model_name).name, args.dataset)
    lora = args.lora and not METHODS[args.unlearn_method].training_free
    return Path("runs") / default_run_name(start, args.unlearn_method + ("-lora" if lora else ""))


def warn_if_other_data(qlora_manifest: dict, splits_fp: dict) -> None:
    """The QLoRA run should have memorised the forget set being unlearned."""
    theirs = qlora_manifest.get("splits", {}).get("train_forget", {}).get("sha256")
    if theirs and theirs != splits_fp["train_forget"]["sha256"]:
        print("warning: train_forget differs from the one the QLoRA run was trained on "
              "(other --dataset, --forget_size, caps or --seed)", file=sys.stderr)


def load_start(args, task, qlora_manifest, splits, device):
    """The starting model (the QLoRA run merged, or --model_name) and its encoder."""
    loaded = load_run(args.model_checkpoints, device, kinds=("qlora",)) if args.model_checkpoints else load_pretrained(args.model_name, device, args.set_pad_id)
    if args.set_pad_id:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    set_pad_token_id(loaded.model, loaded.tokenizer.pad_token_id)
    if qlora_manifest is not None:
        args.model_name = qlora_manifest["base_model"]  # the run's base, recorded in the manifest
        warn_if_other_data(qlora_manifest, split_fingerprint(splits))
    encoder = Encoder(loaded.tokenizer, args.max_length, task=task)
    cli.check_max_length(encoder, task.all_words)
    return loaded, encoder


def qlora_binding(qlora_run, qlora_manifest) -> dict:
    """Manifest fields naming the QLoRA run a baseline started from (None without one)."""
    return {
        "qlora_run": str(qlora_run) if qlora_run else None,
        "qlora_adapter_sha256": qlora_manifest.get("adapter_sha256") if qlora_manifest else None,
        "qlora_base_weights_sha256": qlora_manifest.get("base_weights_sha256") if qlora_manifest else None,
    }


def draw_reference(qlora_run: str, splits) -> float:
    """``--icl_draws``: the QLoRA run's val_retain ACC (the utility bound of the choice), checked
    with the validation splits before any model loads."""
    for split in ("val_retain", "val_forget"):
        if not len(splits.get(split, ())):
            raise cli.UsageError(f"--icl_draws: the draws are compared on {split}, and this data has none")
    path = Path(qlora_run) / METRICS
    metrics = read_json(path) if path.is_file() else {}
    if "val_retain" not in metrics:
        raise cli.UsageError(f"--model_checkpoints {qlora_run}: no val_retain metrics in {METRICS} (--icl_draws bounds the "
                             "draws' utility by it; evaluate the QLoRA run with val_retain)")
    return float(metrics["val_retain"]["accuracy"])


def best_draw(guards, seeds, loaded, encoder, splits, batch_size, device, reference_val_retain: float) -> guardrails.Guardrail:
    """``--icl_draws``: each drawn context evaluated on the selection criterion's splits (``utils.select.READ``:
    train_forget, val_retain, val_forget; never a test split) and the one ``utils.select.choose`` picks,
    with every draw's figures in its record."""
    candidates = []
    for seed, guard in zip(seeds, guards):
        prompt = prefix_embeddings(loaded.model, loaded.tokenizer, guard.text)
        metrics = evaluate(loaded.model, encoder, splits, batch_size, device, prompt=prompt, split_names=list(READ)).metrics
        candidates.append({"seed": seed, **{s: float(metrics[s]["accuracy"]) for s in READ}})
        if distributed.is_main():
            print(f"draw {len(candidates)} (seed {seed}): " + ", ".join(f"{s} {candidates[-1][s]:.2f}" for s in READ))
    chosen = choose(candidates, reference_val_retain)
    k = seeds.index(chosen["seed"])
    if distributed.is_main():
        print(f"kept draw {k + 1} (seed {chosen['seed']}): forget score {chosen['forget_score']:.2f}, "
              f"val_retain floor {chosen['val_retain_floor']:.2f}{'' if chosen['constraint_met'] else ' (no draw meets it)'}")
    draws = {"candidates": candidates, "chosen_seed": chosen["seed"], "reference_val_retain": reference_val_retain,
             "val_retain_floor": chosen["val_retain_floor"], "constraint_met": chosen["constraint_met"]}
    return guardrails.Guardrail(guards[k].text, {**guards[k].record, "draws": draws}, guards[k].input_filter)


def run_training_free(args, data, method, out: Path, qlora_manifest, splits) -> None:
    """A training-free method: its prefix (names or in-context examples) or input filter (bad
    input is refused here, before any model loads), the starting model evaluated on every split
    with the prefix as prompt embeddings or behind the filter, and a run folder holding the
    prefix or the filter's record and pointing to the model."""
    task = data.task
    seeds = attempt_seeds(args.seed, args.icl_draws - 1) if "icl_draws" in method.flags else [args.seed]
    guards = [method.prefix(guardrails.GuardrailOptions(args.forget_names, args.icl_forget, args.icl_retain, seed, data), splits, task)
              for seed in seeds]
    floor_from = draw_reference(args.model_checkpoints, splits) if len(seeds) > 1 else None
    cli.check_tokenizer(args)  # --max_length, before any model is loaded
    device = select_device()
    loaded, encoder = load_start(args, task, qlora_manifest, splits, device)
    guard = best_draw(guards, seeds, loaded, encoder, splits, args.eval_batch_size, device, floor_from) if len(seeds) > 1 else guards[0]
    prompt = prefix_embeddings(loaded.model, loaded.tokenizer, guard.text) if guard.text is not None else None
    if distributed.is_main():
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        what = f"prefix {prompt.size(0)} tokens" if prompt is not None else f"input filter on {len(guard.input_filter.names)} names"
        print(f"device {device}, method {args.unlearn_method} (training-free), {what}")
        if prompt is not None and limit and prompt.size(0) + args.max_length > limit:
            print(f"warning: the prefix ({prompt.size(0)} tokens) plus --max_length {args.max_length} exceeds the "
                  f"model's {limit} positions", file=sys.stderr)
    evaluation = evaluate(loaded.model, encoder, splits, args.eval_batch_size, device, prompt=prompt, split_names=args.eval_splits,
                          input_filter=guard.input_filter)

    if distributed.is_main():
        # the run is rebuilt from the QLoRA run it points to: an absolute path, found from any working directory
        qlora_run = Path(args.model_checkpoints).resolve() if args.model_checkpoints else None
        with atomic_run_dir(out, args.overwrite) as tmp:
            loaded.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            saved = {"weights": None, **(save_prefix(tmp, loaded.tokenizer, guard.text) if guard.text is not None else {})}
            manifest = run_manifest(
                "baseline", data, splits, model_name=args.model_name, model_path=loaded.model_path, seed=args.seed,
                threads=args.threads,
                method=args.unlearn_method, training_free=True, prefix=guard.text, guardrail=guard.record,
                lora=False, **qlora_binding(qlora_run, qlora_manifest), saved=saved,
            )
            stats = {**TrainStats().as_dict(), "seconds": 0.0, "training_samples": 0, "prefix_tokens": saved.get("prefix_tokens", 0)}
            save_run(tmp, vars(args), evaluation, manifest, stats)
        print(format_table({args.unlearn_method: evaluation.metrics}))
        print(f"run folder: {out}")
    distributed.barrier()


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    weight = check_args(args)
    method = METHODS[args.unlearn_method]
    out = Path(args.output_path or default_output(args))
    check_output(out, args.overwrite)
    qlora_manifest = read_manifest(Path(args.model_checkpoints), kinds=("qlora",)) if args.model_checkpoints else None
    warn_if_oracle(qlora_manifest, args.model_checkpoints)
    seed_everything(args.seed)
    data = cli.data_config(args)
    cli.check_forget_targets(args, data.task)
    splits = prepare_splits(data)
    if method.training_free:
        return run_training_free(args, data, method, out, qlora_manifest, splits)
    counterfactual = (counterfactual_retain(splits["train_forget"], forgotten_names(args.forget_names, data), args.seed,
                                            share=args.counterfactual_retain) if args.counterfactual_retain else None)
    spare = unused_retain(data, args.pseudo_retain) if args.pseudo_retain else None  # before any model loads
    cli.check_tokenizer(args)  # --max_length, before any model is loaded
    ckpt = cli.check_resume(args, out, splits)

    device = select_device()
    loaded, encoder = load_start(args, data.task, qlora_manifest, splits, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    pseudo = None
    if spare is not None:  # the starting model's own answers, before any update
        spare, pseudo = pseudo_labelled(model, encoder, spare, args.eval_batch_size, device)
        if distributed.is_main():
            print(describe_pseudo(pseudo))
    extra = [f for f in (counterfactual, spare) if f is not None]

    features = select_features(method, training_set(encoder, splits, args.seed, relabel_forget=method.relabel_forget,
                                                    extra_retain=pd.concat(extra, ignore_index=True) if extra else None,
                                                    generic_label=args.generic_label), weight)
    weights = method_weights(method, weight, vars(args))
    needs_reference = method.needs_reference(weights)
    if args.lora:
        lora = lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, target_modules=lora_target_modules(model))
        model = add_lora(model, lora)
        reference = AdapterOffReference() if needs_reference else NoReference()
    else:
        model.requires_grad_(True)  # a merged PEFT model comes back frozen
        reference = build_reference_store(model, method, features, args.eval_batch_size, device, tokenizer.pad_token_id,
                                          args.kl_topk, weights) if needs_reference else NoReference()
    params = [p for p in model.parameters() if p.requires_grad]
    if distributed.is_main():
        print(f"device {device}, method {args.unlearn_method}, {'LoRA' if args.lora else 'full fine-tuning'}, "
              f"{len(features)} training samples, trainable parameters {sum(p.numel() for p in params):,}, "
              f"reference {reference.stats}")

    cfg = TrainConfig(args.lr, args.num_epochs, args.train_batch_size, args.weight_decay, args.warmup_ratio,
                      args.max_grad_norm, args.seed, log_every=1, **ckpt)
    tracking = open_trackers(cfg)  # --report_to: kept open by train for the evaluation metrics
    try:
        stats = train(model, params, make_loss_fn(method, reference, weights), features, cfg, device,
                      tokenizer.pad_token_id, desc=args.unlearn_method, trackers=tracking)
        bad = nonfinite_parameters((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if bad:
            raise TrainingDiverged(f"non-finite weights after training ({bad[0]}, {len(bad)} tensors)")
    except TrainingDiverged as e:
        tracking.close()
        print(f"error: {args.unlearn_method} diverged: {e}; nothing saved (try a lower --lr than {args.lr:g})", file=sys.stderr)
        sys.exit(1)
    evaluation = evaluate(model, encoder, splits, args.eval_batch_size, device, split_names=args.eval_splits)
    tracking.finish(evaluation.metrics, stats.steps)

    if distributed.is_main():  # one run folder, whatever the number of processes
        with atomic_run_dir(out, args.overwrite) as tmp:
            saved = save_unlearned(tmp, model, args.lora, args.model_checkpoints)
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            manifest = run_manifest(
                "baseline", data, splits, model_name=args.model_name, model_path=loaded.model_path, seed=args.seed,
                threads=args.threads,
                method=args.unlearn_method,
                loss_weights={"retain": weight if method.retain_term else None, "retain_term": method.retain_term,
                              **weights.params},
                lora=args.lora,
                **qlora_binding(args.model_checkpoints, qlora_manifest),
                reference={k: v for k, v in reference.stats.items() if k != "seconds"},
                saved=saved,
            )
            if pseudo is not None:
                manifest["pseudo_retain"] = pseudo
            save_run(tmp, vars(args), evaluation, manifest, {**stats.as_dict(), "reference": reference.stats, "training_samples": len(features)})
        cli.remove_checkpoints(out)
        print(format_table({args.unlearn_method: evaluation.metrics}))
        print(f"run folder: {out}")
    distributed.barrier()


if __name__ == "__main__":
    main()
