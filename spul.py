#!/usr/bin/env python
"""SPUL: learn a soft prompt (P-tuning) that makes a frozen LLM unlearn the forget set.
The model is a qlora.py run (base in full precision, LoRA merged) or a pre-trained model
(--model_name alone); only the prompt encoder trains, on train_retain + train_forget mixed in
the same batches, with L = L_f + alpha * L_r + beta * L_kl. Saves the prompt (PEFT adapter and
encoder weights), config, metrics with the prompt on the four paper splits and the two
validation splits, train stats and a manifest binding the prompt to its model and data into
one run folder."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from utils import cli, distributed
from utils.augment import counterfactual_retain, describe_pseudo, forget_name_swaps, forget_name_typos, forgotten_names, pseudo_labelled
from utils.data import prepare_splits, training_set, unused_retain
from utils.evaluation import evaluate, format_table
from utils.models import DEFAULT_MODEL, select_device
from utils.guardrails import HARD_PREFIXES, hard_prefix_text, prefix_embeddings, save_prefix
from utils.prompt import PROMPT_NORMS, add_prompt, prompt_embeddings, save_prompt, token_embedding_norm, trainable_parameters, with_hard_prefix
from utils.runs import TOKENIZER_DIR, atomic_run_dir, check_output, default_run_name, save_run
from utils.spul_loss import SpulObjective, forget_fit_note, has_dropout
from utils.kinds import load_checked
from utils.loading import load_pretrained
from utils.select import attempt_seeds
from utils.spul_run import check_sources, kept_attempt, passes_guard, resume_encoder, spul_manifest
from utils.template import Encoder
from utils.trackers import open_trackers
from utils.training import TrainConfig, TrainingDiverged, TrainStats, seed_everything, train


def build_parser():
    p = cli.parser(__doc__)
    cli.add_data_args(p)
    g = p.add_argument_group("frozen model")
    g.add_argument("--model_checkpoints", default=None, help="a qlora.py run folder: its base model is loaded in full precision and the LoRA adapter merged in")
    cli.add_model_args(p)
    p.set_defaults(model_name=None)  # None: the QLoRA run's base, else the embedded default
    g.add_argument("--force", action="store_true", help="use a QLoRA run (or --resume_from run) whose recorded hashes do not match the files it points to")
    g = p.add_argument_group("soft prompt (P-tuning, MLP encoder) and loss")
    g.add_argument("--ptuning_num_tokens", type=int, default=30, help="number p of virtual tokens prepended to the input")
    g.add_argument("--ptuning_hidden_size", type=int, default=128, help="hidden size h of the prompt encoder's MLP")
    g.add_argument("--prompt_norm", default="free", choices=PROMPT_NORMS, help="free: the paper's P-tuning, the encoder's output as it is; token: each prompt row rescaled to the mean norm of the model's token embeddings (ours: keeps the prompt at the scale the model was trained on, see the README)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the retain cross-entropy L_r")
    g.add_argument("--beta", type=float, default=0.5, help="weight of KL(no prompt || prompt) on retain samples; 0 skips the reference forward")
    cli.add_forget_target_args(g, "the prompt")
    g.add_argument("--forget_swaps", type=int, default=0, metavar="K", help="entity forget sets: add K copies of each forget text with its forgotten names swapped for other forgotten names (seeded), to the forget side of the loss with generic labels, so that each person is seen in more contexts (ours, utils/augment.py); 0 (default): off")
    g.add_argument("--forget_typos", type=int, default=0, metavar="K", help="entity forget sets: add K copies of each forget text with every forgotten name misspelled (one seeded letter-level edit per name: a letter dropped, doubled or replaced; never a swap of two letters, the name_typo probe's edit, nor a case change), to the forget side of the loss with generic labels, so that the prompt also forgets near-miss spellings (ours, utils/augment.py); 0 (default): off")
    g.add_argument("--hard_prefix", default="none", choices=HARD_PREFIXES, help="none (default, the paper): the soft prompt alone; instruction: the instruction_prompt baseline's text, which names the forgotten people, as fixed tokens before the soft prompt (ours: the names in front make \"names a forgotten person\" readable at the label position, see the README)")
    g.add_argument("--forget_names", nargs="+", metavar="NAME", default=None, help="the forgotten names for --counterfactual_retain, --forget_swaps, --forget_typos and --hard_prefix instruction (default: those recorded by an entities-recipe split folder, e.g. the embedded rt)")
    g.add_argument("--resume_from", default=None, help="a spul.py run folder whose prompt encoder weights initialise this run (fresh optimiser and schedule)")
    g.add_argument("--cache_reference", action="store_true", default=True, help="(default) keep the no-prompt reference's final hidden states at the label positions of each retain sample after its first visit (d floats per label position, the same KL up to float rounding): epochs after the first skip the reference forward. Turned off, with a note, when the frozen model has active dropout (its reference is then not a fixed function of the input)")
    g.add_argument("--no_cache_reference", dest="cache_reference", action="store_false", help="compute the reference on the fly at every step (the release's KL without its stored logits)")
    cli.add_train_args(p, lr=1e-4, epochs=10, batch=32, warmup=0.1, weight_decay=0.001, max_grad_norm=0.3, save_every=200)
    g = p.add_argument_group("validation guard (ours)")
    g.add_argument("--restarts", type=int, default=0, metavar="N",
                   help="after training, evaluate val_forget; while its ACC is above --restart_val_forget, train again from a "
                        "fresh prompt with seed + 1000 (then + 2000, ...), at most N times, and keep the first attempt at or "
                        "under the bound, else the one with the lowest val forget ACC. Each attempt is the same computation as "
                        "a run with its seed. It reads validation data (never a test split), so the kept run's val_forget is "
                        "no longer held out; train_stats.json records every attempt (\"guard\"), --report_to logs them one after another in "
                        "one tracker run. 0 (default, the paper): one attempt, no guard")
    g.add_argument("--restart_val_forget", type=float, default=15.0, metavar="ACC",
                   help="the guard's bound on val_forget ACC in %% (default 15: above it, a run of the CPU recipe has not "
                        "learned the names, see docs/experiments-cpu.md)")
    cli.add_output_args(p)
    return p


def check_args(args) -> None:
    cli.check_common(args)
    checks = {
        "ptuning_num_tokens": (args.ptuning_num_tokens >= 1, "must be at least 1"),
        "ptuning_hidden_size": (args.ptuning_hidden_size >= 1, "must be at least 1"),
        "alpha": (args.alpha >= 0, "must be >= 0"),
        "beta": (args.beta >= 0, "must be >= 0"),
        "forget_swaps": (args.forget_swaps >= 0, "must be >= 0"),
        "forget_typos": (args.forget_typos >= 0, "must be >= 0"),
        "weight_decay": (args.weight_decay >= 0, "must be >= 0"),
        "warmup_ratio": (0 <= args.warmup_ratio < 1, "must be in [0, 1)"),
        "max_grad_norm": (args.max_grad_norm > 0, "must be positive"),
        "restarts": (args.restarts >= 0, "must be >= 0"),
        "restart_val_forget": (0 <= args.restart_val_forget <= 100, "must be an ACC in [0, 100]"),
    }
    for name, (ok, why) in checks.items():
        if not ok:
            raise cli.UsageError(f"--{name} {getattr(args, name)}: {why}")
    if args.restarts and (args.resume or args.resume_from):
        raise cli.UsageError(f"--restarts {args.restarts}: not with --resume or --resume_from (each attempt starts from a fresh prompt)")
    if args.forget_names and not (uses_names(args) or args.hard_prefix != "none"):
        raise cli.UsageError("--forget_names: only used with --counterfactual_retain, --forget_swaps, --forget_typos or --hard_prefix")
    # run kinds, --model_name vs the QLoRA run, --resume_from binding; the base model in use
    args.model_name = check_sources(args.model_checkpoints, args.model_name, args.resume_from, args.force, args.hard_prefix)


def uses_names(args) -> bool:
    """Whether a copy of the forget texts needs the forgotten names (the flags of utils/augment.py)."""
    return bool(args.counterfactual_retain or args.forget_swaps or args.forget_typos)


def default_output(args) -> Path:
    source = Path(args.model_checkpoints).name if args.model_checkpoints else Path(args.model_name or DEFAULT_MODEL).name
    return Path("runs") / default_run_name(source, args.dataset, "spul")


def load_frozen_source(args, device):
    """The model SPUL freezes: the ``--model_checkpoints`` QLoRA run (binding-checked, merged)
    or the pre-trained ``--model_name``. Returns (Loaded, mismatches accepted with --force)."""
    if args.model_checkpoints:
        return load_checked(args.model_checkpoints, device, args.force, kinds=("qlora",))
    return load_pretrained(args.model_name, device, args.set_pad_id), []


@dataclass
class Attempt:
    """One training of the prompt from a fresh start (``--restarts`` makes several)."""
    seed: int
    model: object  # the PEFT model wrapping the frozen source model
    prompt: torch.Tensor  # its prompt embeddings, after the hard prefix if any
    stats: TrainStats
    objective: SpulObjective
    val_forget: float | None = None  # val_forget ACC, when the guard is on


def train_prompt(args, cfg: TrainConfig, frozen, tokenizer, encoder, splits, names, spare, prefix_text, row_norm,
                 cache_reference, device, tracking, task) -> Attempt:
    """Everything that depends on the seed: the copies of forget texts (--counterfactual_retain,
    --forget_swaps, --forget_typos), the prompt's initialisation, the batches and the generic-label draw; then
    train. A fresh PEFT wrapper each time: prompt learning leaves the frozen model untouched."""
    seed = cfg.seed
    extra = counterfactual_retain(splits["train_forget"], names, seed, share=args.counterfactual_retain) if args.counterfactual_retain else None
    copies = []  # forget-side copies of the forget texts
    if args.forget_swaps:
        copies.append(forget_name_swaps(splits["train_forget"], names, seed, args.forget_swaps))
    if args.forget_typos:
        copies.append(forget_name_typos(splits["train_forget"], names, seed, args.forget_typos))
    extra_forget = pd.concat(copies, ignore_index=True) if copies else None
    if spare is not None:
        extra = spare if extra is None else pd.concat([extra, spare], ignore_index=True)
    model = add_prompt(frozen, args.ptuning_num_tokens, args.ptuning_hidden_size, seed, row_norm)
    if args.resume_from:
        resume_encoder(model, args.resume_from)
    if distributed.is_main():
        print(f"soft prompt, seed {seed}: trainable parameters {sum(p.numel() for p in trainable_parameters(model)):,}")
    features = training_set(encoder, splits, seed, relabel_forget=True, extra_retain=extra, extra_forget=extra_forget,
                            generic_label=args.generic_label)
    fixed = prefix_embeddings(model, tokenizer, prefix_text) if prefix_text else None
    prompt_fn = with_hard_prefix(prompt_embeddings, fixed)  # the soft prompt, after the hard prefix if any
    objective = SpulObjective(prompt_embeddings, args.alpha, args.beta, reference_cache=cache_reference, fixed_prefix=fixed)
    try:
        stats = train(model, trainable_parameters(model), objective, features, cfg, device, tokenizer.pad_token_id, desc="spul", trackers=tracking)
    except TrainingDiverged as e:
        print(f"error: SPUL diverged: {e}; nothing saved (try a lower --lr than {args.lr:g})", file=sys.stderr)
        sys.exit(1)
    note = forget_fit_note(stats.epoch_means, 1 if args.generic_label else len(task.generic_labels))
    if note and distributed.is_main():
        print(note)
    with torch.no_grad():
        prompt = prompt_fn(model).detach()
    return Attempt(seed, model, prompt, stats, objective)


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    out = Path(args.output_path or default_output(args))
    check_output(out, args.overwrite)
    seed_everything(args.seed)
    data = cli.data_config(args)
    cli.check_forget_targets(args, data.task)
    splits = prepare_splits(data)
    if args.restarts and not len(splits.get("val_forget", ())):
        raise cli.UsageError(f"--restarts {args.restarts}: the guard reads val_forget, and this data has none")
    names = forgotten_names(args.forget_names, data) if uses_names(args) else None
    spare = unused_retain(data, args.pseudo_retain) if args.pseudo_retain else None  # before any model loads
    prefix_text = hard_prefix_text(args.hard_prefix, args.forget_names, data, splits, f"--hard_prefix {args.hard_prefix}")
    cli.check_tokenizer(args)  # --max_length, before any model is loaded
    ckpt = cli.check_resume(args, out, splits)

    device = select_device()
    source, forced = load_frozen_source(args, device)  # the QLoRA run merged, or --model_name
    tokenizer = source.tokenizer
    encoder = Encoder(tokenizer, args.max_length, task=data.task)
    cli.check_max_length(encoder, data.task.all_words)
    pseudo = None
    if spare is not None:  # the frozen model's own answers, before the prompt exists
        spare, pseudo = pseudo_labelled(source.model, encoder, spare, args.eval_batch_size, device)
        if distributed.is_main():
            print(describe_pseudo(pseudo))
    row_norm = token_embedding_norm(source.model) if args.prompt_norm == "token" else None
    cache_reference = args.cache_reference and not has_dropout(source.model)
    if args.cache_reference and not cache_reference and distributed.is_main():
        print("note: reference cache off: the frozen model has dropout > 0, so its no-prompt reference changes from visit to visit")
    cfg = TrainConfig(args.lr, args.num_epochs, args.train_batch_size, args.weight_decay, args.warmup_ratio, args.max_grad_norm, args.seed, **ckpt)
    tracking = open_trackers(cfg)  # --report_to: kept open by train for the evaluation metrics
    if distributed.is_main():
        print(f"device {device}, frozen model {source.manifest['kind']}")

    attempts = []
    for k, seed in enumerate(attempt_seeds(args.seed, args.restarts)):
        if k:
            seed_everything(seed)  # as a run started with this seed
        attempt = train_prompt(args, replace(cfg, seed=seed), source.model, tokenizer, encoder, splits, names, spare,
                               prefix_text, row_norm, cache_reference, device, tracking, data.task)
        attempts.append(attempt)
        if not args.restarts:
            break
        attempt.val_forget = evaluate(attempt.model, encoder, splits, args.eval_batch_size, device, prompt=attempt.prompt,
                                      split_names=["val_forget"]).metrics["val_forget"]["accuracy"]
        passed = passes_guard(attempt.val_forget, args.restart_val_forget)
        if distributed.is_main():
            print(f"guard: attempt {k + 1} (seed {seed}): val forget ACC {attempt.val_forget:.2f}, "
                  f"{'at or under' if passed else 'above'} {args.restart_val_forget:g}")
        if passed:
            break
    kept = attempts[kept_attempt([a.val_forget for a in attempts], args.restart_val_forget)] if args.restarts else attempts[0]
    model, stats, objective = kept.model, kept.stats, kept.objective
    evaluation = evaluate(model, encoder, splits, args.eval_batch_size, device, prompt=kept.prompt, split_names=args.eval_splits)
    tracking.finish(evaluation.metrics, stats.steps)
    guard = {"attempts": [{"seed": a.seed, "val_forget_accuracy": a.val_forget, "steps": a.stats.steps,
                           "train_seconds": sum(a.stats.epoch_seconds)} for a in attempts],
             "kept_seed": kept.seed, "bound": args.restart_val_forget} if args.restarts else None

    if distributed.is_main():  # one run folder, whatever the number of processes
        with atomic_run_dir(out, args.overwrite) as tmp:
            save_prompt(model, tmp)
            hard = {"kind": args.hard_prefix, **save_prefix(tmp, tokenizer, prefix_text)} if prefix_text else None
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            manifest = spul_manifest(data, splits, source, tmp, model, tokenizer, model_checkpoints=args.model_checkpoints,
                                     model_name=args.model_name, seed=args.seed, threads=args.threads, alpha=args.alpha,
                                     beta=args.beta, resume_from=args.resume_from, forced=forced, hard_prefix=hard,
                                     generic_label=args.generic_label, trained_seed=kept.seed)
            manifest["prompt"]["row_norm"] = row_norm
            if pseudo is not None:
                manifest["pseudo_retain"] = pseudo
            save_run(tmp, vars(args), evaluation, manifest, {**stats.as_dict(), "kl_reference": objective.cost(),
                                                             **({"guard": guard} if guard else {})})
        cli.remove_checkpoints(out)
        print(format_table({"SPUL": evaluation.metrics}))
        print(f"run folder: {out}")
    distributed.barrier()


if __name__ == "__main__":
    main()
