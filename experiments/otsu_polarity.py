"""Which side of Otsu's threshold is the nucleus? The reports' baseline takes the minority side,
which finds bright nuclei on dark fluorescence and dark nuclei on a bright stain when nuclei cover
less than half the image. This prints the test Dice of the minority, dark and bright sides on a
dataset's test split, so a reader can see how much the choice of side matters there.

    python experiments/otsu_polarity.py --data ../shared/nuclei/monuseg --dataset monuseg
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cdcl_nuclei import data  # noqa: E402
from cdcl_nuclei.baseline import grayscale, otsu_mask, otsu_threshold  # noqa: E402
from cdcl_nuclei.metrics import SegmentationMeter  # noqa: E402

SIDES = {"minority (the reports' baseline)": otsu_mask,
         "dark side": lambda im: (g := grayscale(im)) <= otsu_threshold(g),
         "bright side": lambda im: (g := grayscale(im)) > otsu_threshold(g)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dataset", default="dsb", choices=("dsb", "monuseg"))
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write this Markdown file")
    args = p.parse_args(argv)
    splits = data.dataset_splits(args.dataset, args.data, seed=args.split_seed)
    samples = data.load_full(splits["test"], 250 if args.dataset == "monuseg" else None)
    lines = [f"Otsu's threshold on the {args.dataset} test split ({len(samples)} images), Dice %:", "",
             "| foreground | over the set | mean per image |", "|---|---|---|"]
    for name, fn in SIDES.items():
        m = SegmentationMeter(instances=False)
        for s in samples:
            m.update(fn(s.image), s.labels, s.id)
        r = m.summary()
        lines.append(f"| {name} | {100 * r['over_set']['DC']:.2f} | {100 * r['per_image_mean']['DC']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
