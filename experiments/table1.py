"""The paper's Table 1 protocol: SupOnly vs CDCL (and optionally other methods) at one labeled
fraction, several seeds, same split; writes a results table.

    python experiments/table1.py --data ../shared/nuclei/dsb2018/stage1_train --dataset dsb \\
        --fraction 1/8 --seeds 0 1 2 --preset small --epochs 10 --iters-per-epoch 30 --out runs/table1

Each (method, seed) run is `train.py` in a subprocess writing to OUT/<method>-seed<k>/; a run whose
metrics.json exists is not repeated, so an interrupted table continues where it stopped. Arguments
after `--` go to every train.py call unchanged (e.g. `-- --lr 1e-3 --threads 2`). The split is the
same for every seed (--split-seed); the seed changes the labeled subset, the initialisation, the
sampling and the augmentation. Writes OUT/results.md, OUT/results.json and OUT/runs.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_DICE = {  # Table 1 of the paper, Dice %
    "dsb": {"1/32": (83.93, 87.49), "1/16": (86.10, 89.88), "1/8": (87.38, 90.09), "1": 90.46},
    "monuseg": {"1/32": (71.83, 75.97), "1/16": (74.72, 77.77), "1/8": (75.81, 78.93), "1": 79.97},
}


def parse_args(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dataset", default="dsb", choices=("dsb", "monuseg"))
    p.add_argument("--fraction", default="1/8")
    p.add_argument("--methods", nargs="+", default=["suponly", "cdcl"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--preset", default="small")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--iters-per-epoch", type=int, default=None)
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--in-process", action="store_true", help="call train.main here instead of a subprocess")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_script", os.path.join(ROOT, "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_one(args, method, seed):
    out = os.path.join(args.out, f"{method}-seed{seed}")
    metrics = os.path.join(out, "metrics.json")
    if os.path.exists(metrics):
        print(f"{method} seed {seed}: done already ({metrics})", flush=True)
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", args.data, "--dataset", args.dataset,
               "--method", method, "--labeled-fraction", args.fraction, "--seed", str(seed),
               "--split-seed", str(args.split_seed), "--preset", args.preset, "--epochs", str(args.epochs),
               "--out", out, "--resume", "auto", "--no-progress"]
        if args.iters_per_epoch:
            cmd += ["--iters-per-epoch", str(args.iters_per_epoch)]
        cmd += args.extra
        print(f"{method} seed {seed}: " + " ".join(cmd), flush=True)
        t0 = time.time()
        if args.in_process:
            code = _train_module().main(cmd[2:])
        else:
            code = subprocess.run(cmd, cwd=ROOT).returncode
        if code != 0:
            raise SystemExit(f"{method} seed {seed}: train.py failed with exit status {code}")
        print(f"{method} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    with open(metrics) as f:
        m = json.load(f)
    with open(os.path.join(out, "log.csv")) as f:
        seconds = sum(float(r["seconds"]) for r in csv.DictReader(f))
    return {"method": method, "seed": seed, "dice_set": m["over_set"]["DC"], "dice_image": m["per_image_mean"]["DC"],
            "jc_set": m["over_set"]["JC"], "aji_image": m["per_image_mean"]["AJI"], "images": m["images"],
            "train_seconds": round(seconds, 1)}


def summarise(rows, key):
    vals = [100 * r[key] for r in rows]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.mean(vals), sd, min(vals), max(vals)


def write_results(args, rows):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table, lines = {}, []
    lines += [f"# Table 1 protocol: {args.dataset}, {args.fraction} labeled, preset {args.preset}", "",
              f"Budget: {args.epochs} epochs x {args.iters_per_epoch or 'ceil(train/batch)'} iterations; "
              f"seeds {args.seeds}; split seed {args.split_seed}; extra train.py arguments: "
              f"`{' '.join(args.extra) or '(none)'}`.", "",
              "Test Dice (%) over the whole test set and as the mean per image; mean ± sample standard "
              "deviation over seeds, [min, max].", "",
              "| method | runs | Dice over the set | Dice mean per image | JC over the set | AJI per image | train s/run |",
              "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method]
        s = {k: summarise(rs, k) for k in ("dice_set", "dice_image", "jc_set", "aji_image")}
        table[method] = {k: {"mean": v[0], "sd": v[1], "min": v[2], "max": v[3]} for k, v in s.items()}
        fmt = lambda v: f"{v[0]:.2f} ± {v[1]:.2f} [{v[2]:.2f}, {v[3]:.2f}]"
        lines.append(f"| {method} | {len(rs)} | {fmt(s['dice_set'])} | {fmt(s['dice_image'])} | "
                     f"{fmt(s['jc_set'])} | {fmt(s['aji_image'])} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    paper = PAPER_DICE.get(args.dataset, {}).get(args.fraction)
    if paper:
        lines += ["", f"The paper (DenseNet-161, 320x320, 80 epochs, ImageNet weights): SupOnly {paper[0]}, "
                      f"CDCL {paper[1]} Dice %."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items()}, "summary": table, "runs": rows}, f, indent=2)
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    rows = [run_one(args, m, s) for s in args.seeds for m in args.methods]
    write_results(args, rows)


if __name__ == "__main__":
    main()
