"""One table of every benchmark row of the CSV files given (or found in a folder), in the order
measured (benchmarks/lease.py puts it in a lease's summary).

    python -m benchmarks.summary benchmarks/out
"""
import argparse
import csv
import glob
import os

from .run import markdown_table

NUMERIC = ("time_ms", "peak_extra_mb", "tflops", "pct_matrix_rate", "max_rel_err", "floor_ms", "x_floor",
           "matrix_rate_tflops", "exp_rate_g")


def read_rows(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                for key in NUMERIC:
                    row[key] = float(row[key]) if row.get(key) not in (None, "") else None
                row["bank_grad"] = row.get("bank_grad") == "1"
                rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="CSV files written by benchmarks.run, or folders of them")
    args = ap.parse_args(argv)
    paths = []
    for p in args.paths:
        # a folder's CSVs in the order written: one per benchmark invocation
        paths += sorted(glob.glob(os.path.join(p, "*.csv")), key=os.path.getmtime) if os.path.isdir(p) else [p]
    rows = read_rows(paths)
    if not rows:
        print("benchmark summary: no rows measured")
        return
    print(f"{rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, {rows[0]['date']}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
