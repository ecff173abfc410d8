#!/usr/bin/env python
"""Fine-tune a causal LM with QLoRA (4-bit NF4 + LoRA) on train_retain + train_forget, so that
it memorises the data it will later unlearn. Saves the adapter, tokenizer, config, metrics on
the four paper splits and the two validation splits and a manifest into one run folder.

With ``--retain_only`` the same recipe trains on train_retain alone: the retrain oracle, the
model that never saw the forget set, against which the forgetting audit (membership-inference
privleak, KS forget quality) measures every unlearned run."""
from __future__ import annotations

from pathlib import Path

from utils import cli, distributed
from utils.data import prepare_splits, training_set
from utils.evaluation import evaluate, format_table
from utils.models import (
    add_lora,
    load_model,
    load_tokenizer,
    lora_config,
    lora_target_modules,
    prepare_for_training,
    resolve_model,
    select_device,
    weights_hash,
)
from utils.qlora_run import label_ce
from utils.runs import TOKENIZER_DIR, atomic_run_dir, check_output, default_run_name, run_manifest, save_run
from utils.template import Encoder
from utils.trackers import open_trackers
from utils.training import TrainConfig, seed_everything, train


def build_parser():
    p = cli.parser(__doc__)
    cli.add_data_args(p)
    cli.add_model_args(p)
    g = p.add_argument_group("LoRA and quantisation")
    g.add_argument("--lora_rank", type=int, default=16, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=int, default=64, help="LoRA scaling alpha")
    g.add_argument("--lora_dropout", "--lora_fropout", type=float, default=0.1, help="LoRA dropout (--lora_fropout, the published README's spelling, is accepted too)")
    g.add_argument("--lora_bias", default="none", choices=["none", "all", "lora_only"], help="which biases LoRA trains")
    g.add_argument("--no_quantize", action="store_true", help="train LoRA on the full-precision model instead of 4-bit NF4")
    cli.add_train_args(p, lr=1e-4, epochs=10, warmup=0.05, save_every=200)
    g = p.add_argument_group("retrain oracle")
    g.add_argument("--retain_only", action="store_true",
                   help="train on train_retain only (same settings otherwise): the retrain oracle, the model that never "
                        "saw the forget set; every split is still evaluated")
    cli.add_output_args(p)
    return p


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_common(args)
    if args.lora_rank < 1 or args.lora_dropout < 0 or args.lora_dropout >= 1:
        raise cli.UsageError("--lora_rank must be >= 1 and --lora_dropout in [0, 1)")
    out = Path(args.output_path or Path("runs") / default_run_name(Path(args.model_name).name, args.dataset, "retrain" if args.retain_only else "qlora"))
    check_output(out, args.overwrite)
    seed_everything(args.seed)

    data = cli.data_config(args)
    splits = prepare_splits(data)
    ckpt = cli.check_resume(args, out, splits)
    model_path = resolve_model(args.model_name)
    tokenizer = load_tokenizer(model_path, args.set_pad_id)
    encoder = Encoder(tokenizer, args.max_length, task=data.task)
    cli.check_max_length(encoder, data.task.all_words)

    device = select_device()
    model, quantized = load_model(model_path, device, quantize=not args.no_quantize)
    model = prepare_for_training(model, quantized, device)
    lora = lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_bias, target_modules=lora_target_modules(model))
    model = add_lora(model, lora)
    if distributed.is_main():
        print(f"device {device}, 4-bit {quantized}, trainable parameters {model.get_nb_trainable_parameters()[0]:,}")

    features = training_set(encoder, splits, args.seed, include_forget=not args.retain_only)
    cfg = TrainConfig(args.lr, args.num_epochs, args.train_batch_size, args.weight_decay, args.warmup_ratio, args.max_grad_norm, args.seed, **ckpt)
    tracking = open_trackers(cfg)  # --report_to: kept open by train for the evaluation metrics
    stats = train(model, model.parameters(), label_ce, features, cfg, device, tokenizer.pad_token_id, desc="qlora", trackers=tracking)
    evaluation = evaluate(model, encoder, splits, args.eval_batch_size, device, split_names=args.eval_splits)
    tracking.finish(evaluation.metrics, stats.steps)

    if distributed.is_main():  # one run folder, whatever the number of processes
        with atomic_run_dir(out, args.overwrite) as tmp:
            model.save_pretrained(tmp / "adapter")
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            manifest = run_manifest(
                "qlora", data, splits, model_name=args.model_name, model_path=model_path, seed=args.seed, threads=args.threads,
                quantized=quantized, adapter_sha256=weights_hash(tmp / "adapter"), lora_target_modules=sorted(lora.target_modules),
                retain_only=args.retain_only,
            )
            save_run(tmp, vars(args), evaluation, manifest, stats.as_dict())
        cli.remove_checkpoints(out)
        print(format_table({"Retrain" if args.retain_only else "QLoRA": evaluation.metrics}))
        print(f"run folder: {out}")
    distributed.barrier()


if __name__ == "__main__":
    main()
