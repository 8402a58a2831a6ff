"""Sweep launch configurations of the Triton kernels on the GPU at hand (prints a table).

    python -m benchmarks.triton_configs --sizes paper,large

Forward (with O) and bank-gradient kernels are timed separately with triton.testing.do_bench
(median); the first launch of each configuration (compilation) is not timed.
"""
import argparse
import functools
import itertools

import torch
import triton

from cdcl_ops._validate import canonical_masks
from cdcl_ops.backends import triton_backward, triton_forward
from cdcl_ops.backends.interface import InverseNorms, Options

from .contenders import SIZES, make_inputs

FWD = [dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=s)
       for bn, bm, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (3,))]
BWD = [dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=s)
       for bn, bm, w, s in itertools.product((32, 64, 128), (64, 128), (4, 8), (3,))]


def _time(fn):
    try:
        fn()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # out of shared memory/registers: that config is not possible
        return float("nan") if "resources" in str(e) or "shared memory" in str(e) else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="paper")
    ap.add_argument("--dtypes", default="bfloat16,tf32")
    ap.add_argument("--kernels", default="fwd,bank_grad")
    args = ap.parse_args()
    for size_name, dt in itertools.product(args.sizes.split(","), args.dtypes.split(",")):
        n, m, d, patch = SIZES[size_name]
        dtype = torch.bfloat16 if dt == "bfloat16" else torch.float32 if dt in ("tf32", "ieee") else torch.float16
        prec = "tf32" if dt == "tf32" else "ieee"
        inp = make_inputs(n, m, d, patch, torch.device("cuda"), dtype=dtype)
        masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                                inp["bank_groups"], inp["group_table"])
        q, p, k = inp["query"], inp["positive"], inp["bank"]
        inv = InverseNorms.of(q, p, k)
        options = Options(10.0, precision=prec)
        # the kernels' own entry points take config=: a launch config to time
        _, lse, _ = triton_forward.forward(q, p, k, inv, masks, options, False)
        gs = torch.rand(n, device="cuda")
        flop = 4 * n * m * d
        for label, configs, call in (
                ("fwd", FWD, functools.partial(triton_forward.forward, q, p, k, inv, masks, options, True)),
                ("bank_grad", BWD, functools.partial(triton_backward.bank_grad, q, k, inv._replace(p=None), masks,
                                                     lse, gs, options))):
            if label not in args.kernels.split(","):
                continue
            default_ms = _time(call)
            results = [(_time(functools.partial(call, config=cfg)), cfg) for cfg in configs]
            results.sort(key=lambda r: (r[0] != r[0], r[0]))
            print(f"{size_name} {dt} {label}: default {default_ms:.3f} ms "
                  f"({flop / default_ms / 1e9:.0f} TFLOP/s)")
            for ms, cfg in results[:3]:
                print(f"    {ms:.3f} ms ({flop / ms / 1e9:.0f} TFLOP/s) {cfg}")


if __name__ == "__main__":
    main()
