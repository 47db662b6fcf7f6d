"""The merge kernels on a device, in float32, float16 and bfloat16, against the CPU in float32.

For each dtype the inputs are rounded to it once; the reference is the CPU float32 kernel on
those rounded values, so what is compared is the kernel's own arithmetic on the device. Per
kernel and dtype it prints the share of sources routed to the same survivor (from
``nearest_survivor``), the largest and the relative (Frobenius) error of the merged values and
keys, and whether they are within tolerance; the exit status is 1 if any is not.

Reproduce: ``python benchmarks/device_compare.py --device cuda`` (``--device cpu`` checks the
half-precision paths on the CPU).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys

import torch

from mergepress.kernels import MergeConfig, merge_adaptive, merge_uniform, nearest_survivor

# Largest relative (Frobenius) error of the merged tensors allowed per dtype: a few output ulps.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
MIN_SAME_ROUTE = 0.999  # sources may flip between near-tied survivors on last-bit differences
CONFIGS = {
    "default": MergeConfig(),
    "gated+keys": MergeConfig(similarity_threshold=0.1, merge_fraction=0.8, max_merge_per_token=4, merge_keys=True),
}


def make_case(L: int, H: int, D: int, seed: int = 0):
    """Keys with a shared direction per head, values, a Knorm split: kept ``(1, H, L/2)``, and a
    per-head adaptive split ``evicted (1, H, L)`` (40% to 80% evicted)."""
    g = torch.Generator().manual_seed(seed)
    keys = 0.7 * torch.randn(1, H, 1, D, generator=g) + torch.randn(1, H, L, D, generator=g)
    values = torch.randn(1, H, L, D, generator=g)
    kept = (-keys.norm(dim=-1)).topk(L // 2, dim=-1).indices
    evicted = torch.rand(1, H, L, generator=g) < torch.linspace(0.4, 0.8, H).view(1, H, 1)
    return keys, values, kept, evicted


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    print("reproduce:", "python", " ".join(shlex.quote(a) for a in ["benchmarks/device_compare.py", *sys.argv[1:]]))
    device = torch.device(args.device)
    keys, values, kept, evicted = make_case(args.length, args.heads, args.head_dim)
    evicted_by_norm = torch.ones_like(evicted).scatter_(2, kept, False)  # the uniform split as a mask
    src = keys.gather(2, evicted_by_norm.nonzero()[:, 2].view(1, args.heads, -1, 1).expand(-1, -1, -1, args.head_dim))
    dst = keys.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, args.head_dim))

    failed = False
    print(f"{'kernel':>9} {'config':>11} {'dtype':>9} {'same route':>11} {'max err v':>10} {'rel err v':>10} "
          f"{'rel err k':>10}  ok")  # fmt: skip
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k, v = keys.to(dtype), values.to(dtype)
        k32, v32 = k.float(), v.float()  # the rounded inputs, in float32, on the CPU
        _, i_ref = nearest_survivor(src.to(dtype).float(), dst.to(dtype).float())
        _, i_dev = nearest_survivor(src.to(dtype).to(device), dst.to(dtype).to(device))
        same = (i_dev.cpu() == i_ref).float().mean().item()
        for kernel, (name, cfg) in itertools.product(["uniform", "adaptive"], CONFIGS.items()):
            if kernel == "uniform":
                ref = merge_uniform(k32, v32, kept, cfg)
                out = merge_uniform(k.to(device), v.to(device), kept.to(device), cfg)
            else:
                ref = merge_adaptive(k32, v32, evicted, cfg)
                out = merge_adaptive(k.to(device), v.to(device), evicted.to(device), cfg)
            out_k, out_v = out[0].cpu(), out[1].cpu()
            assert out_v.dtype == dtype and bool(torch.isfinite(out_v).all())
            err_v, err_k = rel_err(out_v, ref[1]), rel_err(out_k, ref[0])
            ok = err_v <= TOLERANCE[dtype] and err_k <= TOLERANCE[dtype] and same >= MIN_SAME_ROUTE
            failed |= not ok
            max_err = (out_v.float() - ref[1]).abs().max().item()
            print(f"{kernel:>9} {name:>11} {str(dtype)[6:]:>9} {same:>11.5f} {max_err:>10.2e} {err_v:>10.2e} "
                  f"{err_k:>10.2e}  {'yes' if ok else 'NO'}")  # fmt: skip
    print("all within tolerance" if not failed else "SOME RESULTS ARE OUT OF TOLERANCE")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
