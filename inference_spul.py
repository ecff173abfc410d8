#!/usr/bin/env python
"""Evaluate a model on the four paper splits (train_retain, train_forget, test_retain, test_forget)
and the two validation splits (val_retain, val_forget):
either a pre-trained model (--model_name, the paper's 'Vanilla' row) or any run folder of this
toolkit (--model_checkpoints). Prints a table and writes metrics JSON into an eval folder.

Two protocols: ``argmax`` (every row of the paper's tables but Vanilla: one teacher-forced
forward, argmax over the vocabulary where the first label token is predicted) and ``generate``
(the paper's Vanilla rows: greedy decoding of a few tokens, label words matched in the text)."""
from __future__ import annotations

from pathlib import Path

from utils import cli, distributed
from utils.kinds import load_checked
from utils.loading import load_pretrained
from utils.data import prepare_splits
from utils.evaluation import Evaluation, evaluate, format_table
from utils.generation import MAX_NEW_TOKENS, evaluate_generation
from utils.models import select_device
from utils.runs import atomic_run_dir, check_output, default_run_name, library_versions, save_run
from utils.template import Encoder
from utils.training import seed_everything


def build_parser():
    p = cli.parser(__doc__)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model_checkpoints", default=None, help="a run folder written by qlora.py, spul.py or baselines.py")
    g.add_argument("--no_prompt", action="store_true",
                   help="evaluate a run's model without what it puts in front of it: a SPUL run's soft prompt, a "
                        "training-free run's prefix or input filter; for comparison")
    g.add_argument("--force", action="store_true", help="load a run whose manifest does not match the model or files it would be loaded with")
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--eval_batch_size", type=int, default=32, help="examples per forward")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=("argmax", "generate"), default="argmax",
                   help="argmax: one teacher-forced forward, the argmax over the whole vocabulary at the position that "
                        "predicts the first label token (the paper's protocol for every row but Vanilla); generate: "
                        "greedy decoding of --max_new_tokens tokens after '### Sentiment:', the label word that occurs "
                        "first in the text is the prediction, anything else is wrong (the paper's Vanilla rows, its "
                        "release's inference_vanilla.py)")
    g.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS,
                   help="with --protocol generate: tokens generated per example (the release's value)")
    cli.add_output_args(p)
    return p


def default_output(args) -> Path:
    if args.model_checkpoints:
        suffix = "-noprompt" if args.no_prompt else ""
        suffix += "-generate" if args.protocol == "generate" else ""
        return Path(str(Path(args.model_checkpoints)).rstrip("/") + f"-eval-{args.dataset}{suffix}")
    protocol = "generate" if args.protocol == "generate" else None
    return Path("runs") / default_run_name(Path(args.model_name).name, args.dataset, "vanilla", protocol)


def check_protocol(args) -> None:
    if args.max_new_tokens < 1:
        raise cli.UsageError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")


def run_protocol(args, loaded, encoder, splits, device, prompt, input_filter) -> Evaluation:
    """Metrics per split under ``--protocol``, in the same format under both; the argmax
    protocol also gives the per-example records and membership-inference AUCs."""
    if args.protocol == "generate":
        return Evaluation(evaluate_generation(loaded.model, encoder, splits, args.eval_batch_size, device, prompt=prompt,
                                              split_names=args.eval_splits, max_new_tokens=args.max_new_tokens,
                                              input_filter=input_filter))
    return evaluate(loaded.model, encoder, splits, args.eval_batch_size, device, prompt=prompt, split_names=args.eval_splits,
                    input_filter=input_filter)


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_common(args)
    check_protocol(args)
    out = Path(args.output_path or default_output(args))
    check_output(out, args.overwrite)
    seed_everything(args.seed)
    data = cli.data_config(args)
    splits = prepare_splits(data)
    cli.check_tokenizer(args)  # --max_length, before any model is loaded

    device = select_device()
    if args.model_checkpoints:
        loaded, forced = load_checked(args.model_checkpoints, device, args.force)
    else:
        loaded, forced = load_pretrained(args.model_name, device, args.set_pad_id), []
    prompt = None if args.no_prompt else loaded.prompt
    input_filter = None if args.no_prompt else loaded.input_filter
    encoder = Encoder(loaded.tokenizer, args.max_length, task=data.task)
    cli.check_max_length(encoder, data.task.all_words)
    evaluation = run_protocol(args, loaded, encoder, splits, device, prompt, input_filter)

    name = ("Vanilla" if not args.model_checkpoints else loaded.manifest["kind"]) + (" (no prompt)" if args.no_prompt else "")
    name += " (generate)" if args.protocol == "generate" else ""
    manifest = {"kind": "eval", "evaluated": loaded.manifest, "source": args.model_checkpoints or args.model_name,
                "prompt_used": prompt is not None, "filter_used": input_filter is not None, "protocol": args.protocol,
                "max_new_tokens": args.max_new_tokens if args.protocol == "generate" else None,
                "forced_mismatches": forced, "seed": args.seed, "data_seed": args.data_seed,
                "threads": args.threads, "versions": library_versions()}
    if distributed.is_main():  # every process holds the gathered metrics; one writes them
        with atomic_run_dir(out, args.overwrite) as tmp:
            save_run(tmp, vars(args), evaluation, manifest)
        print(format_table({name: evaluation.metrics}))
        print(f"metrics: {out / 'metrics.json'}")
    distributed.barrier()


if __name__ == "__main__":
    main()
