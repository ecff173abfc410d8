#!/usr/bin/env python
"""Evaluate a model on the four splits (train_retain, train_forget, test_retain, test_forget):
either a pre-trained model (--model_name, the paper's 'Vanilla' row) or any run folder of this
toolkit (--model_checkpoints). Prints a table and writes metrics JSON into an eval folder."""
from __future__ import annotations

from pathlib import Path

from utils import cli, distributed
from utils.binding import load_checked
from utils.checkpoints import load_pretrained
from utils.data import prepare_splits
from utils.evaluation import evaluate_splits, format_table
from utils.models import select_device
from utils.runs import atomic_run_dir, check_output, default_run_name, library_versions, save_run
from utils.template import GENERIC_LABELS, LABEL_WORDS, Encoder
from utils.training import seed_everything


def build_parser():
    p = cli.parser(__doc__)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model_checkpoints", default=None, help="a run folder written by qlora.py, spul.py or baselines.py")
    g.add_argument("--no_prompt", action="store_true", help="evaluate a SPUL run's model with its soft prompt removed, for comparison")
    g.add_argument("--force", action="store_true", help="load a run whose manifest does not match the model or files it would be loaded with")
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--eval_batch_size", type=int, default=32, help="examples per forward")
    cli.add_output_args(p)
    return p


def default_output(args) -> Path:
    if args.model_checkpoints:
        suffix = "-noprompt" if args.no_prompt else ""
        return Path(str(Path(args.model_checkpoints)).rstrip("/") + f"-eval-{args.dataset}{suffix}")
    return Path("runs") / default_run_name(Path(args.model_name).name, args.dataset, "vanilla")


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_common(args)
    out = Path(args.output_path or default_output(args))
    check_output(out, args.overwrite)
    seed_everything(args.seed)
    splits = prepare_splits(args)
    cli.check_tokenizer(args)  # --max_length, before any model is loaded

    device = select_device()
    if args.model_checkpoints:
        loaded, forced = load_checked(args.model_checkpoints, device, args.force)
    else:
        loaded, forced = load_pretrained(args.model_name, device, args.set_pad_id), []
    prompt = None if args.no_prompt else loaded.prompt
    encoder = Encoder(loaded.tokenizer, args.max_length)
    cli.check_max_length(encoder, LABEL_WORDS + GENERIC_LABELS)
    metrics = evaluate_splits(loaded.model, encoder, splits, args.eval_batch_size, device, prompt=prompt)

    name = ("Vanilla" if not args.model_checkpoints else loaded.manifest["kind"]) + (" (no prompt)" if args.no_prompt else "")
    manifest = {"kind": "eval", "evaluated": loaded.manifest, "source": args.model_checkpoints or args.model_name,
                "prompt_used": prompt is not None, "forced_mismatches": forced, "versions": library_versions()}
    if distributed.is_main():  # every process holds the gathered metrics; one writes them
        with atomic_run_dir(out, args.overwrite) as tmp:
            save_run(tmp, args, metrics, manifest)
        print(format_table({name: metrics}))
        print(f"metrics: {out / 'metrics.json'}")
    distributed.barrier()


if __name__ == "__main__":
    main()
