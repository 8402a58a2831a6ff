"""The paper's Table 1 protocol at one labeled fraction: several methods, several seeds, one split,
with each seed's labeled subset shared by every method; paired differences against CDCL and Otsu's
threshold on the same test images.

    python experiments/table1.py --data ../shared/nuclei/dsb2018/stage1_train --fraction 1/32 \\
        --seeds 0 1 2 3 4 --out runs/table1/dsb-1_32 -- --epochs 30 --iters-per-epoch 10 --threads 1

Each (method, seed) run is `train.py` in a subprocess writing to OUT/<method>-seed<k>/; a run whose
metrics.json exists is not repeated and an interrupted one resumes from its last.pt, so the table
can be built piece by piece (`--seeds 0` today, `--seeds 0 1 2` tomorrow). Arguments after `--` go
to every train.py call unchanged. After every finished run OUT/runs.csv, OUT/results.md and
OUT/results.json are rewritten from all finished runs.
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
PAPER_DICE = {  # Table 1 of the paper, Dice %: (SupOnly, CDCL)
    "dsb": {"1/32": (83.93, 87.49), "1/16": (86.10, 89.88), "1/8": (87.38, 90.09)},
    "monuseg": {"1/32": (71.83, 75.97), "1/16": (74.72, 77.77), "1/8": (75.81, 78.93)},
}
# (column, metrics.json key, part): Dice and the instance metrics of the model's nuclei as the run decodes them
COLUMNS = (("dice_set", "DC", "over_set"), ("dice_image", "DC", "per_image_mean"), ("aji_set", "AJI", "over_set"),
           ("aji_image", "AJI", "per_image_mean"), ("pq_set", "PQ", "over_set"), ("f1_set", "F1", "over_set"),
           ("dsb_set", "DSB", "over_set"))
METRICS = tuple(c for c, _, _ in COLUMNS)
HEADERS = ("Dice over the set", "Dice mean per image", "AJI over the set", "AJI mean per image", "PQ over the set",
           "F1@0.5 over the set", "DSB score over the set")
# the no-learning rows, from the same runs' reports (identical in every run of one split)
# the same runs' nuclei as 4-connected components of the foreground: the decoding before the watershed
COMPONENTS = ("aji_set", "aji_image", "pq_set", "f1_set", "dsb_set")
CLASSICAL = (("otsu", "Otsu + watershed (classical, no learning)"),
             ("otsu_components", "Otsu threshold as components (no learning)"))
# paired differences: (method, against)
PAIRS = (("meanteacher", "suponly"), ("cdcl", "suponly"), ("cdcl", "meanteacher"))
SEEN = ("fdp_share", "bdp_share", "with_negative_share", "negatives_per_query")


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
    p.add_argument("--methods", nargs="+", default=["suponly", "meanteacher", "cdcl"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--preset", default="small")
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--in-process", action="store_true",
                   help="call cdcl_nuclei.cli_train.main here instead of a subprocess")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def run_dir(args, method, seed):
    return os.path.join(args.out, f"{method}-seed{seed}")


def train_once(args, method, seed):
    out = run_dir(args, method, seed)
    if os.path.exists(os.path.join(out, "metrics.json")):
        print(f"{method} seed {seed}: done already", flush=True)
        return
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", args.data, "--dataset", args.dataset,
           "--method", method, "--labeled-fraction", args.fraction, "--seed", str(seed),
           "--split-seed", str(args.split_seed), "--preset", args.preset, "--out", out,
           "--resume", "auto", "--no-progress", *args.extra]
    print(f"{method} seed {seed}: " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    if args.in_process:
        from cdcl_nuclei import cli_train  # torch and the package load only for in-process runs

        code = cli_train.main(cmd[2:])
    else:
        code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"{method} seed {seed}: train.py failed with exit status {code}")
    print(f"{method} seed {seed}: {time.time() - t0:.0f} s", flush=True)


def read_run(args, method, seed):
    out = run_dir(args, method, seed)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(out, "log.csv")) as f:
        log = list(csv.DictReader(f))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    def scores(pipeline, prefix=""):
        return {prefix + c: 100 * m[pipeline][part][key] for c, key, part in COLUMNS if key in m[pipeline][part]}

    seen = {}
    for k in SEEN:  # means over the epochs in which the contrastive loss ran
        vals = [float(r[k]) for r in log if r.get(k)]
        seen[k] = round(statistics.mean(vals), 4) if vals else ""
    grid = cfg.get("grid", 8)
    components = {"components_" + k: v for k, v in scores("model_components").items() if k in COMPONENTS}
    # pixel Dice of the foreground itself (the probability thresholded, before any decoding: the paper's
    # metric); the watershed drops blobs without a confident core, which would count against the pixels
    pixels = {k: v for k, v in scores("model_components").items() if k.startswith("dice")}
    return {"method": method, "seed": seed, **scores("model"), **pixels, **components,
            **{k: v for name, _ in CLASSICAL for k, v in scores(name, name + "_").items()},
            "checkpoint": m.get("checkpoint", ""), "test_images": m["images"], "steps": int(log[-1]["step"]),
            "crop": cfg["model"]["input_size"],
            "resize": cfg.get("resize", False), "train_seconds": round(sum(float(r["seconds"]) for r in log), 1),
            "patch_px": cfg["model"]["input_size"] // grid, "patch_feat": cfg["model"]["input_size"] // 8 // grid,
            **seen}


def t_interval(diffs):
    """mean and the 95% Student-t interval of paired differences (None with fewer than 2)."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, None
    from scipy.stats import t

    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, (mean - half, mean + half)


def _ms(vals):
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def write_results(args, rows):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["method"], r["seed"]): r for r in rows}
    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    r0 = rows[0]
    lines = [f"# Table 1 protocol: {args.dataset}, {args.fraction} labeled, preset {args.preset}", "",
             f"Split seed {args.split_seed}, {r0['test_images']} test images; "
             f"{'images resized to' if r0['resize'] else 'native-resolution crops of'} {r0['crop']} px; "
             f"{r0['steps']} steps per run; train.py arguments `{' '.join(args.extra) or '(none)'}`.", "",
             "Test scores (%), mean ± sample sd over the seeds: Dice of the foreground (the probability "
             "thresholded, before any decoding), and the instance metrics "
             "of the nuclei as the run decodes them (`--instances`, the watershed by default); over the set = "
             "one ratio of sums over all test images, per image = the mean of per-image ratios. The no-learning "
             "rows come from the same test images.", "",
             "| method | seeds | " + " | ".join(HEADERS) + " | train s/run |", "|---" * (len(HEADERS) + 3) + "|"]
    summary = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        summary[m] = {k: [r[k] for r in rs] for k in METRICS}
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(_ms(summary[m][k]) for k in METRICS)
                     + f" | {statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = [_ms([r["components_" + k] for r in rs]) if k in COMPONENTS else "-" for k in METRICS]
        lines.append(f"| {m}, nuclei as components | {len(rs)} | " + " | ".join(cells) + " | - |")
    for name, label in CLASSICAL:
        lines.append(f"| {label} | - | " + " | ".join(f"{r0[name + '_' + k]:.2f}" for k in METRICS) + " | - |")
    lines += ["", "Every seed (Dice over the set / mean per image; AJI over the set / mean per image):", "",
              "| seed | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s in sorted({r["seed"] for r in rows}):
        cells = [f"{by[(m, s)]['dice_set']:.2f} / {by[(m, s)]['dice_image']:.2f}; "
                 f"{by[(m, s)]['aji_set']:.2f} / {by[(m, s)]['aji_image']:.2f}" if (m, s) in by else "-"
                 for m in methods]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    paired = {}
    pairs = [(a, b) for a, b in PAIRS if a in methods and b in methods]
    if pairs:
        keys = ("dice_set", "dice_image", "aji_set", "aji_image")
        lines += ["", "Paired differences (same seed, same labeled subset), mean and 95% t-interval:", "",
                  "| difference | seeds | Dice over the set | Dice mean per image | AJI over the set "
                  "| AJI mean per image |", "|---|---|---|---|---|---|"]
        for a, b in pairs:
            seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
            if not seeds:
                continue
            cells = []
            for k in keys:
                mean, ci = t_interval([by[(a, s)][k] - by[(b, s)][k] for s in seeds])
                paired.setdefault(f"{a} - {b}", {})[k] = {"mean": mean, "ci95": ci}
                cells.append(f"{mean:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""))
            lines.append(f"| {a} - {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    seen_rows = [r for r in rows if r["method"] == "cdcl" and r["fdp_share"] != ""]
    if seen_rows:
        lines += ["", f"What L_contr saw (CDCL runs, means over the epochs it ran): patches of "
                      f"{r0['patch_px']} x {r0['patch_px']} pixels ({r0['patch_feat']} x {r0['patch_feat']} "
                      "features at stride 8).", "",
                  "| seed | FDP patches | BDP patches | pixels that are queries with a negative "
                  "| negatives per query |",
                  "|---|---|---|---|---|"]
        for r in seen_rows:
            lines.append(f"| {r['seed']} | {100 * r['fdp_share']:.1f}% | {100 * r['bdp_share']:.1f}% | "
                         f"{100 * r['with_negative_share']:.1f}% | {r['negatives_per_query']:.0f} |")
    paper = PAPER_DICE.get(args.dataset, {}).get(args.fraction)
    if paper:
        lines += ["", f"The paper (DenseNet-161 from ImageNet weights, 320x320, 80 epochs): SupOnly "
                      f"{paper[0]}, CDCL {paper[1]} Dice %."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "summary": summary, "paired": paired, "runs": rows}, f, indent=2)
    return lines


def main(argv=None):
    args = parse_args(argv)
    for s in args.seeds:
        for m in args.methods:
            train_once(args, m, s)
            done = [read_run(args, m2, s2) for s2 in args.seeds for m2 in args.methods
                    if os.path.exists(os.path.join(run_dir(args, m2, s2), "metrics.json"))]
            lines = write_results(args, done)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
