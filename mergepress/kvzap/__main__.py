"""``python -m mergepress.kvzap``: train KVzap surrogates offline, calibrate thresholds, compare scorers.

    python -m mergepress.kvzap train --model smollm2-135m --out mergepress/kvzap/weights/smollm2-135m
    python -m mergepress.kvzap calibrate --model smollm2-135m --out results/kvzap_thresholds.csv \\
        --manifest mergepress/kvzap/weights/smollm2-135m/manifest.json
    python -m mergepress.kvzap compare --model smollm2-135m --out results/kvzap_vs_knorm_error.csv
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, HF model id or local path")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mergepress.kvzap", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="collect KVzip+ targets, fit linear and MLP surrogates, write a model card")
    _common(t)
    t.add_argument("--out", required=True, help="folder for linear.safetensors, mlp.safetensors, manifest, card")
    t.add_argument("--n-train", type=int, default=96, help="training texts")
    t.add_argument("--n-test", type=int, default=16, help="held-out texts (from held-out essays)")
    t.add_argument("--min-tokens", type=int, default=320, help="shortest text, in tokens")
    t.add_argument("--max-tokens", type=int, default=640, help="longest text, in tokens")
    t.add_argument("--tokens-per-text", type=int, default=0, help="training rows kept per text (0: all)")
    t.add_argument("--test-fraction", type=float, default=0.2, help="share of essay text held out")
    t.add_argument("--hidden-dim", type=int, default=64, help="MLP hidden width")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="dtype of the saved weights")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--cache",
        help="folder for per-text targets, reused by a later run with the same data options "
        "(default: $MERGEPRESS_CACHE/kvzap/<model>-<data options>); 'none' to keep nothing",
    )

    for name, helptext in (
        ("calibrate", "thresholds giving target compression ratios of DMSPress(KVzapPress) on RULER"),
        ("compare", "attention-output error of KVzap vs KnormPress at a compression ratio on RULER"),
    ):
        c = sub.add_parser(name, help=helptext)
        _common(c)
        c.add_argument("--data", default="data/ruler-2048.jsonl", help="RULER suite JSONL")
        c.add_argument("--per-task", type=int, default=2, help="samples per task")
        c.add_argument("--tasks", help="comma-separated tasks (default: all in the suite)")
        c.add_argument("--out", required=True, help="CSV to write")
        c.add_argument("--weights", help="folder with linear/mlp.safetensors (default: the shipped ones)")
        if name == "calibrate":
            c.add_argument("--targets", default="0.5,0.75,0.875", help="compression ratios to calibrate")
            c.add_argument("--fixed", default="-4,-3", help="thresholds to measure as they are")
            c.add_argument("--manifest", help="manifest.json to record the calibrated thresholds in")
        else:
            c.add_argument("--skip", type=int, default=2, help="first samples of each task left out (calibration's)")
            c.add_argument("--ratio", type=float, default=0.5)
            c.add_argument("--thresholds", help="manifest.json or 'mlp=t,linear=t' for the DMS rows")
            c.add_argument("--no-generate", action="store_true", help="skip greedy answers (RULER score)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m mergepress.kvzap " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.command == "train":
        from mergepress.kvzap.pipeline import train

        train(args, command)
    elif args.command == "calibrate":
        from mergepress.kvzap.evaluate import calibrate

        calibrate(args, command)
    else:
        from mergepress.kvzap.evaluate import compare

        compare(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
