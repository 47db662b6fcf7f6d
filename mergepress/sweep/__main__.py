"""``python -m mergepress.sweep``: run a press grid on RULER, resumable, shardable with accelerate.

Example::

    python -m mergepress.sweep --model smollm2-135m --length 2048 --n 20 \\
        --presses knorm,merging_knorm --ratios 0.25,0.5,0.75,0.875 --out results/knorm-2048.csv

The suite is generated once (seeded) and saved under ``data/``, so every later run and every
process reads exactly the same samples. Under ``accelerate launch --multi_gpu --num_processes N``
the samples are sharded across processes (GPUs, or CPU cores through a gloo group) and merged
into one CSV at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mergepress.models import load_model
from mergepress.ruler import OFFLINE_TASKS, generate_suite, load_jsonl, save_jsonl
from mergepress.sweep.registry import registry, uses_threshold
from mergepress.sweep.run import Config, run_sweep, summarize


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mergepress.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, HF model id or local path")
    p.add_argument("--length", type=int, default=2048, help="RULER context length in the model's tokens")
    p.add_argument("--n", type=int, default=20, help="samples per task")
    p.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="comma-separated RULER tasks")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--data",
        help="suite JSONL, read if it exists, else generated and saved there "
        "(default: data/ruler-<model>-<length>-n<n>-seed<seed>.jsonl)",
    )
    p.add_argument("--presses", default="knorm,merging_knorm", help=f"comma-separated names from: {registry()}")
    p.add_argument("--ratios", default="0.25,0.5,0.75,0.875", help="compression ratios of ratio-based presses")
    p.add_argument(
        "--thresholds", default="-4,-3", help="score thresholds of DMS configurations (dms_knorm: around -20)"
    )
    p.add_argument(
        "--merge", default="", help="merge parameters for merging_* presses, JSON, e.g. '{\"merge_fraction\": 0.75}'"
    )
    p.add_argument("--max-new-tokens", type=int, help="override the tasks' generation budgets")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop taking new samples after this many minutes, then save and exit (rerun to resume); "
        "0 only folds in the part files of a killed sharded run",
    )
    p.add_argument("--out", required=True, help="results CSV (appended to; its folder is created)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    args = p.parse_args(argv)
    if args.max_minutes is not None and args.max_minutes < 0:
        p.error(f"--max-minutes must be 0 or more, got {args.max_minutes}")
    return args


def build_configs(args: argparse.Namespace) -> list[Config]:
    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry()]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; the registry holds: {', '.join(registry())}")
    merge = json.loads(args.merge) if args.merge else {}
    ratios = [float(r) for r in args.ratios.split(",") if r]
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    configs = []
    for name in names:
        params = merge if name.startswith("merging_") else {}
        values = [0.0] if name == "no_press" else thresholds if uses_threshold(name) else ratios
        configs += [Config(name, v, params) for v in values]
    return configs


def load_suite(args: argparse.Namespace, tokenizer) -> tuple:
    """The suite from ``--data``, or generated and saved so every later run reads the same file."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    safe_model = args.model.replace("/", "_")
    path = Path(args.data or f"data/ruler-{safe_model}-{args.length}-n{args.n}-seed{args.seed}.jsonl")
    if path.exists():
        suite = load_jsonl(path)
        suite = suite[suite["task"].isin(tasks)].reset_index(drop=True)
    else:
        suite = generate_suite(
            tasks=tasks, n_samples=args.n, context_length=args.length, tokenizer=tokenizer, seed=args.seed
        )
        save_jsonl(suite, path)
    return suite, path


def _distributed() -> tuple[int, int, Callable[[], None] | None, str | None]:
    """``(rank, world_size, barrier, device)`` from the environment torchrun / accelerate set up.

    Read from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` with a plain ``torch.distributed`` group
    (gloo on CPU, nccl on GPU): accelerate's state reports a single process on CPU-only machines
    even when two were launched, which would make every process run every sample.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, None, None
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = None
    if torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    else:  # share the cores: one process per core group
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier, device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = build_configs(args)
    rank, world_size, barrier, device = _distributed()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)

    if rank == 0:
        suite, suite_path = load_suite(args, tokenizer)
    if barrier is not None:
        barrier()
    if rank != 0:
        suite, suite_path = load_suite(args, tokenizer)
    digest = hashlib.sha256(suite_path.read_bytes()).hexdigest()[:16]
    settings = {
        "model": args.model,
        "dtype": str(model.dtype),
        "suite": str(suite_path),
        "suite_sha256": digest,
        "max_new_tokens": args.max_new_tokens,
        "mergepress": importlib.metadata.version("mergepress"),
        "kvpress": importlib.metadata.version("kvpress"),
    }
    out = run_sweep(
        model,
        tokenizer,
        suite,
        configs,
        args.out,
        settings,
        args.max_new_tokens,
        rank,
        world_size,
        barrier,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
    )
    if rank == 0:
        table = summarize(out)
        summary_path = out.with_name(out.stem + ".summary.csv")
        table.to_csv(summary_path, index=False)
        print(table.to_string(index=False))
        print(f"\nrows: {out}\nsummary: {summary_path}\ncommand: python -m mergepress.sweep {' '.join(sys.argv[1:])}")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
