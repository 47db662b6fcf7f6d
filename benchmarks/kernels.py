"""Merge kernels side by side: time and peak extra memory against upstream kvpress and a loop.

For each context length L and compression ratio, on one layer's cache ``(1, H, L, D)``:

(a) ``upstream``: ``kvpress.MergingPress.merge`` (whole ``(B, H, n_evict, n_kept)`` similarity),
(b) ``uniform``: :func:`mergepress.kernels.merge_uniform` on the same kept indices,
(c) ``adaptive``: :func:`mergepress.kernels.merge_adaptive` on the same split (as a mask),
(d) ``loop``: the adaptive kernel written the seed's way, one (batch, head) at a time, each with
    its whole similarity matrix (:func:`loop_reference`).

The four run alternately (a b c d a b c d ...) in one process, so background load hits them
alike; the table reports the fastest repetition and the ratios ours/upstream (b/a),
adaptive/uniform (c/b) and loop/adaptive (d/c). Every output is checked against the others.

Time: on CPU, the process's CPU time (user + system) with ``--threads 1`` (the default). The
machine this was written on has 2 cores shared with other jobs: CPU time measures the work
whatever the load, while with 2 threads each parallel region waits for whichever thread the
other jobs deschedule. Wall time is in the CSV too. On CUDA: wall time after synchronising.

Peak extra memory: on CPU, the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` before each call, after ``malloc_trim``) above its resident set before
the call, so it counts everything the call allocates, outputs included (column ``output_mb``).
On CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the call.

A method whose estimated peak (upstream: the similarity matrix plus two caches' worth of copies)
would not fit in the memory available minus a margin is skipped, and the table says so.

Reproduce: ``nice python benchmarks/kernels.py`` (about 20 CPU-minutes), ``--quick`` for 2K-8K.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import itertools
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from mergepress.kernels import MergeConfig, merge_adaptive, merge_uniform

try:
    from kvpress import KnormPress, MergingPress
except ImportError:  # a bare machine (e.g. a GPU box with torch only): no upstream baseline
    MergingPress = None

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("upstream", "uniform", "adaptive", "loop")
EPS = 1e-6  # kvpress's norm floor


def make_case(L: int, H: int, D: int, ratio: float, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A cache with structure (a shared direction per head) and a Knorm-like split.

    Returns ``keys, values (1, H, L, D)``, ``kept (1, H, n_kept)`` (top-k order, as a press gives
    it) and ``evicted (1, H, L)`` bool, the same split as a mask.
    """
    g = torch.Generator().manual_seed(seed)
    keys = 0.7 * torch.randn(1, H, 1, D, generator=g) + torch.randn(1, H, L, D, generator=g)
    values = torch.randn(1, H, L, D, generator=g)
    n_kept = int(L * (1 - ratio))  # kvpress.utils.compute_n_kept
    kept = (-keys.norm(dim=-1)).topk(n_kept, dim=-1).indices
    evicted = torch.ones(1, H, L, dtype=torch.bool).scatter_(2, kept, False)
    return keys.to(device, dtype), values.to(device, dtype), kept.to(device), evicted.to(device)


def loop_reference(keys: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """The adaptive kernel (default gates) one (batch, head) at a time, as the seed wrote it.

    ``keys, values (B, H, L, D)``, ``evicted (B, H, L)``; returns the merged ``values``. Each
    head builds its whole ``(n_evict, n_kept)`` similarity matrix.
    """
    out = values.clone()
    B, H = keys.shape[:2]
    for b, h in itertools.product(range(B), range(H)):
        src, dst = evicted[b, h].nonzero().squeeze(1), (~evicted[b, h]).nonzero().squeeze(1)
        if len(src) == 0 or len(dst) == 0:
            continue
        ks, kd = keys[b, h, src].float(), keys[b, h, dst].float()
        ks = ks / ks.norm(dim=-1, keepdim=True).clamp(min=EPS)
        kd = kd / kd.norm(dim=-1, keepdim=True).clamp(min=EPS)
        sim, target = (ks @ kd.T).max(dim=-1)
        vs, vd = values[b, h, src].float(), values[b, h, dst].float()
        ns, nd = vs.norm(dim=-1), vd.norm(dim=-1)
        w = sim.clamp(0, 1) * ns / (ns + nd[target] + EPS)
        acc = vd.index_add(0, target, w.unsqueeze(1) * vs)
        den = torch.ones_like(nd).index_add_(0, target, w)
        out[b, h, dst] = (acc / den.unsqueeze(1)).to(values.dtype)
    return out


def run_method(method: str, keys, values, kept, evicted, ratio: float) -> torch.Tensor:
    """One call of ``method`` as a press would make it; returns its merged values."""
    if method == "upstream":
        return MergingPress(KnormPress(ratio)).merge(keys, values, kept)[1]  # (1, H, L, D)
    if method == "uniform":
        return merge_uniform(keys, values, kept, MergeConfig())[1]  # (1, H, n_kept, D)
    if method == "adaptive":
        return merge_adaptive(keys, values, evicted, MergeConfig())[1]  # (1, H, L, D)
    return loop_reference(keys, values, evicted)  # (1, H, L, D)


def at_kept(method: str, merged: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The merged survivors ``(1, H, n_kept, D)`` in top-k order, whatever the method returns."""
    if method == "uniform":
        return merged
    return merged.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, merged.shape[-1]))


def estimate_bytes(method: str, H: int, L: int, D: int, n_kept: int, elem: int) -> int:
    """Peak extra memory a method needs (rough upper estimate, for the skip rule).

    The similarity matrix in float32 (upstream: all heads at once; loop: one head) plus two
    caches' worth of gathered copies. Ours are bounded by their block budget plus copies.
    """
    n_evict, cache = L - n_kept, H * L * D * max(elem, 4)
    if method == "upstream":
        return 4 * H * n_evict * n_kept + 2 * cache
    if method == "loop":
        return 4 * n_evict * n_kept + 2 * cache
    return 2 * cache + 256 * 2**20


# --- measurement ---------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def available_bytes() -> int:
    return 1024 * int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))


def measure(fn, device: torch.device):
    """Run ``fn()`` once: ``(result, cpu_s, wall_s, peak_extra_bytes)``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = 1024 * _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 1024 * _status_kb("VmHWM")
    return out, cpu, wall, peak - base


def repetitions(L: int) -> int:
    """Repetitions per method: 5 up to 4K, then fewer, 1 from 32K."""
    return max(1, min(5, 32768 // L))


# --- report --------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    """One line per (L, ratio): times, the three ratios, peak extra memory (``~`` = estimate, skipped)."""

    def fmt(x: float, width: int = 9, digits: int = 3) -> str:
        return f"{'-':>{width}}" if math.isnan(x) else f"{x:>{width}.{digits}f}"

    print("\ntime (s, fastest repetition; '-' = skipped) and peak extra memory (MB; '~' = estimate, not run)")
    print("ratios are time ratios: ours/up = uniform/upstream, adap/uni = adaptive/uniform, loop/adap = loop/adaptive")
    header = f"{'L':>6} {'CR':>5} | " + " ".join(f"{m:>9}" for m in METHODS)
    print(header + " | ours/up adap/uni loop/adap | " + " ".join(f"{m[:4] + '_MB':>9}" for m in METHODS))
    cases = sorted({(r["L"], r["ratio"]) for r in rows})
    for L, cr in cases:
        by = {r["method"]: r for r in rows if (r["L"], r["ratio"]) == (L, cr)}
        t = {m: by[m]["time_s"] if m in by else math.nan for m in METHODS}
        mem = []
        for m in METHODS:
            if m in by and by[m]["status"] != "ok":
                mem.append(f"{'~' + str(round(by[m]['est_mb'])):>9}")
            else:
                mem.append(fmt(by[m]["peak_extra_mb"] if m in by else math.nan, 9, 0))
        line = f"{L:>6} {cr:>5} | " + " ".join(fmt(t[m]) for m in METHODS)
        line += f" | {fmt(t['uniform'] / t['upstream'], 7, 2)} {fmt(t['adaptive'] / t['uniform'], 9, 2)}"
        print(line + f" {fmt(t['loop'] / t['adaptive'], 9, 2)} | " + " ".join(mem))
    for r in rows:
        if r["status"] != "ok":
            print(f"  L={r['L']} CR={r['ratio']} {r['method']}: {r['status']}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time and peak extra memory against L, log-log; skipped runs' memory estimates hollow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(METHODS, ["tab:red", "tab:blue", "tab:green", "tab:gray"]))
    for method, cr in sorted({(r["method"], r["ratio"]) for r in rows}):
        g = sorted((r for r in rows if (r["method"], r["ratio"]) == (method, cr)), key=lambda r: r["L"])
        ok = [r for r in g if r["status"] == "ok"]
        style, label = ("-" if cr == 0.5 else "--"), f"{method} CR {cr}"
        axes[0].plot(
            [r["L"] for r in ok], [r["time_s"] for r in ok], style, marker="o", color=colors[method], label=label
        )
        mem = [r["peak_extra_mb"] / 1024 for r in ok]
        axes[1].plot([r["L"] for r in ok], mem, style, marker="o", color=colors[method], label=label)
        est = [r for r in g if r["status"].startswith("skipped: needs")]
        axes[1].plot([r["L"] for r in est], [r["est_mb"] / 1024 for r in est], "o", mfc="none", color=colors[method])
    for ax, ylabel in zip(axes, ["time (s)", "peak extra memory (GB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(1.0, color="black", lw=0.8, ls=":")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_title("hollow: estimate for a run skipped (memory)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path.relative_to(ROOT)}")


def run_case(L: int, ratio: float, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """All methods on one (L, ratio) case, alternately; one CSV row per method."""
    H, D, elem = args.heads, args.head_dim, torch.finfo(dtype).bits // 8
    keys, values, kept, evicted = make_case(L, H, D, ratio, device, dtype)
    n_kept, reps = kept.shape[2], repetitions(L)
    results, best = {}, {}
    for _, method in itertools.product(range(reps), args.methods):
        est = estimate_bytes(method, H, L, D, n_kept, elem)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_bytes()
        if est > free - args.margin_gb * 2**30:
            best[method] = dict(
                status=f"skipped: needs ~{est / 2**30:.1f} GB, {free / 2**30:.1f} GB available", est=est
            )
            continue
        if method == "upstream" and MergingPress is None:
            best[method] = dict(status="skipped: kvpress is not installed", est=est)
            continue
        if method == "loop" and L > args.loop_max_len:
            best[method] = dict(status=f"skipped: L > --loop-max-len {args.loop_max_len} (time budget)", est=est)
            continue
        out, cpu, wall, peak = measure(lambda m=method: run_method(m, keys, values, kept, evicted, ratio), device)
        t = cpu if device.type == "cpu" else wall
        if method not in best or t < best[method]["time_s"]:
            best[method] = dict(status="ok", est=est, time_s=t, cpu_s=cpu, wall_s=wall)
        best[method]["peak"] = max(peak, best[method].get("peak", 0))
        best[method]["output_mb"] = out.numel() * out.element_size() / 2**20 * (2 if method == "uniform" else 1)
        results[method] = at_kept(method, out, kept)
        del out

    # Every method must produce the same merge. A last-bit difference in a similarity can send a
    # near-tied source to another survivor: count such rows, fail only if they are not rare.
    ref = results.get("uniform")
    for method, out in results.items():
        diff = (out.float() - ref.float()).abs().amax(-1) if ref is not None else torch.full((1,), math.nan)
        best[method]["max_abs_diff"] = diff.max().item()
        best[method]["rows_off"] = int((diff > (1e-4 if dtype == torch.float32 else 5e-2)).sum())
        if best[method]["rows_off"] > 1e-4 * diff.numel():
            raise AssertionError(f"L={L} CR={ratio}: {method} differs from uniform on {best[method]['rows_off']} rows")

    rows = []
    for method, r in best.items():
        shown = f"{r['time_s']:.3f}s {r['peak'] / 2**20:.0f}MB" if r["status"] == "ok" else r["status"]
        print(f"L={L:>6} CR={ratio} {method:>9}: {shown}", flush=True)
        rows.append(
            dict(L=L, ratio=ratio, method=method, heads=H, head_dim=D, dtype=str(dtype).split(".")[1],
                 device=str(device), threads=torch.get_num_threads(), n_evict=L - n_kept, n_kept=n_kept, reps=reps,
                 time_s=r.get("time_s", math.nan), cpu_s=r.get("cpu_s", math.nan), wall_s=r.get("wall_s", math.nan),
                 peak_extra_mb=r.get("peak", math.nan) / 2**20, est_mb=r["est"] / 2**20,
                 output_mb=r.get("output_mb", math.nan), max_abs_diff=r.get("max_abs_diff", math.nan),
                 rows_off=r.get("rows_off", 0), status=r["status"])
        )  # fmt: skip
    return rows


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="L in 2K, 4K, 8K only")
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (default 2K ... 64K)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the module docstring)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--loop-max-len", type=int, default=32768, help="skip the loop reference above this L")
    parser.add_argument("--margin-gb", type=float, default=3.0, help="memory left free when deciding to skip")
    parser.add_argument("--tag", default=None, help="output file suffix (default: device, quick)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    lengths = args.lengths or ([2048, 4096, 8192] if args.quick else [2048 * 2**i for i in range(6)])
    parts = [args.device.split(":")[0], *([args.dtype] if args.dtype != "float32" else []), *(["quick"] * args.quick)]
    tag = args.tag or "_".join(parts)
    print("reproduce:", "python", " ".join(shlex.quote(a) for a in ["benchmarks/kernels.py", *sys.argv[1:]]))
    print(
        f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
        f"H={args.heads}, D={args.head_dim}, metric: {'CPU' if device.type == 'cpu' else 'wall'} time"
    )

    if device.type == "cuda":  # initialise CUDA and cuBLAS before anything is timed
        case = make_case(256, 2, 64, 0.5, device, dtype)
        for method in args.methods:
            run_method(method, *case, 0.5)
    rows = []
    for L, ratio in itertools.product(lengths, args.ratios):
        rows += run_case(L, ratio, args, device, dtype)
    path = ROOT / "results" / "benchmarks" / f"kernels_{tag}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print(f"wrote {path.relative_to(ROOT)}")
    title = f"merge kernels, H={args.heads}, D={args.head_dim}, {args.dtype} on {device}, {args.threads} thread(s)"
    plot(rows, ROOT / "figures" / f"kernel_benchmark_{tag}.png", title)


if __name__ == "__main__":
    main()
