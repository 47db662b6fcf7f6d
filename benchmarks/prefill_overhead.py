"""What merge-on-evict adds to an end-to-end prefill of the embedded model.

For each context length, four presses prefill the same essay tokens (``model.model``, no LM
head, a fresh ``DynamicCache``), alternately (A A' B B' A A' ...) so background load hits them
alike: KnormPress vs MergingPress(KnormPress), and AdaKVPress(KnormPress) vs
MergingPress(AdaKVPress(KnormPress)). Each pair's overhead is the ratio of the medians.

Time is the process's CPU time with ``--threads 1`` (the default), which measures the work
whatever else runs on a shared machine; wall time is in the CSV too. Peak extra memory is the
rise of the peak resident set during the prefill (``VmHWM`` reset through
``/proc/self/clear_refs``).

Reproduce: ``nice python benchmarks/prefill_overhead.py`` (about 20 CPU-minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from kvpress import AdaKVPress, KnormPress
from transformers import DynamicCache

from mergepress import MergingPress
from mergepress.models import load_model
from mergepress.ruler.sources import essay_text

ROOT = Path(__file__).resolve().parents[1]


def presses(ratio: float) -> dict:
    """The four presses, as (baseline, merging) pairs."""
    return {
        "knorm": KnormPress(ratio),
        "merging(knorm)": MergingPress(KnormPress(ratio)),
        "adakv": AdaKVPress(KnormPress(ratio)),
        "merging(adakv)": MergingPress(AdaKVPress(KnormPress(ratio))),
    }


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def prefill(model, press, ids: torch.Tensor) -> tuple[float, float, float]:
    """One prefill of ``ids (1, L)`` with ``press``: ``(cpu_s, wall_s, peak_extra_mb)``."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=DynamicCache())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, (_status_kb("VmHWM") - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio of every press")
    parser.add_argument("--reps", type=int, default=5, help="prefills per press and length (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("reproduce:", "python", " ".join(shlex.quote(a) for a in ["benchmarks/prefill_overhead.py", *sys.argv[1:]]))

    model, tok = load_model("smollm2-135m")
    tokens = tok(essay_text(), return_tensors="pt").input_ids
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, smollm2-135m "
          f"({model.config.num_hidden_layers} layers, {model.config.num_key_value_heads} KV heads), "
          f"compression ratio {args.ratio}, metric: CPU time, median of {args.reps}")  # fmt: skip
    prefill(model, KnormPress(args.ratio), tokens[:, :256])  # warm up

    rows = []
    for L in args.lengths:
        ids = tokens[:, :L]
        for rep, (name, press) in itertools.product(range(args.reps), presses(args.ratio).items()):
            cpu, wall, peak = prefill(model, press, ids)
            rows.append(dict(L=L, press=name, rep=rep, cpu_s=cpu, wall_s=wall, peak_extra_mb=peak))
            print(f"L={L} rep={rep} {name:>15}: {cpu:.2f} s CPU, {wall:.2f} s wall, {peak:.0f} MB", flush=True)

    df = pd.DataFrame(rows)
    out = ROOT / "results" / "benchmarks" / "prefill_overhead.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)

    print(f"\nmedian CPU time (s) of a prefill, and the merge overhead (ratio of medians - 1), CR {args.ratio}")
    print(f"{'L':>6} {'base':>16} {'base s':>8} {'merging s':>10} {'ratio':>7} {'overhead':>9} {'MB base/merging':>16}")
    for L, base in itertools.product(args.lengths, ["knorm", "adakv"]):
        a = df[(df.L == L) & (df.press == base)]
        b = df[(df.L == L) & (df.press == f"merging({base})")]
        ta, tb = statistics.median(a.cpu_s), statistics.median(b.cpu_s)
        mem = f"{a.peak_extra_mb.max():.0f}/{b.peak_extra_mb.max():.0f}"
        print(f"{L:>6} {base:>16} {ta:>8.2f} {tb:>10.2f} {tb / ta:>7.3f} {100 * (tb / ta - 1):>8.1f}% {mem:>16}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
