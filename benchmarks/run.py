"""Benchmark entry point (docs/design.md §6): memory and time of the masked InfoNCE contenders,
or (--loss supcon-all / supcon-negatives) of the supervised contrastive loss's.

    python -m benchmarks.run --sizes paper,large --device cuda
    python -m benchmarks.run --sizes paper --device cpu --contenders reference,chunked
    python -m benchmarks.run --loss supcon-all --sizes contrastiveseg,paper --device cpu --bank-grad no

GPU runs happen in this process (peak memory from torch.cuda.max_memory_allocated); each CPU run
happens in a fresh subprocess so that its peak RSS is its own. Writes a CSV (with device, versions
and date) and a Markdown table into --out, and prints the table last.

Each row's time is also given as a multiple of its floor (benchmarks/measure.py: floor_ms), the
least time this machine needs for the row's matrix work and exponentials at rates measured in the
same run: on a GPU the 8192^3 matrix rate of the row's precision, on a CPU the best fp32 (or bf16)
rate of torch's products at the cpu kernel's tiles and at 1024-row tiles and the rate of exp on a
tile, on all cores at once.
"""
import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import tempfile

import torch

from .measure import CPU_BLOCK, CPU_TILE, cpu_rates, first_line, floor_ms, matrix_rates, max_rel_error, measure
from .suites import SUITES

FIELDS = ["date", "device", "torch", "triton", "loss", "size", "N", "M", "D", "bank_grad", "contender",
          "dtype", "status", "time_ms", "peak_extra_mb", "tflops", "pct_matrix_rate",
          "max_rel_err", "repeats", "timed", "floor_ms", "x_floor", "matrix_rate_tflops",
          "exp_rate_g", "note"]


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores (CPU)"


def _versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "-"
    return torch.__version__, tv


def _size(name, loss="masked_infonce"):
    """A named size of the loss's suite, or a sweep point 'N<n>xM<m>' (D 128)."""
    found = SUITES[loss].size(name)
    if found is None:
        raise SystemExit(f"unknown size {name!r}: one of {list(SUITES[loss].sizes)} or N<n>xM<m>")
    return found


def _run_worker(spec):
    name, size_name, bank_grad, out_file, repeats, time_limit, mem_gb, loss = spec.split("|")
    import resource
    # a CPU contender that would need more than this gets a MemoryError (recorded as oom)
    # instead of waking the kernel's OOM killer on a shared machine
    limit = int(float(mem_gb) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(os.cpu_count())
    try:
        result, outputs = measure(name, _size(size_name, loss), bank_grad == "1", torch.device("cpu"),
                                  int(repeats), float(time_limit), loss=loss)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        result, outputs = dict(status="oom"), None
    torch.save(dict(result=result, outputs=outputs), out_file)


def _run_cpu(name, size_name, bank_grad, repeats, time_limit, tmp, mem_gb, loss):
    out_file = os.path.join(tmp, f"{name}-{size_name}-{int(bank_grad)}.pt".replace("(", "_").replace(")", "_"))
    spec = "|".join([name, size_name, str(int(bank_grad)), out_file, str(repeats), str(time_limit),
                     str(mem_gb), loss])
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", spec],
                              capture_output=True, text=True, timeout=time_limit * 3 + 120)
    except subprocess.TimeoutExpired:
        return dict(status="timeout"), None
    if proc.returncode != 0:
        oom = proc.returncode in (-9, 137) or "MemoryError" in proc.stderr
        return dict(status="oom" if oom else "error: " + proc.stderr.strip().splitlines()[-1][:80]), None
    saved = torch.load(out_file)
    return saved["result"], saved["outputs"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", default="masked_infonce", choices=list(SUITES),
                    help="the loss whose contenders run (supcon-*: supervised_contrast's denominators)")
    ap.add_argument("--sizes", default="paper",
                    help="comma list of the loss's sizes (masked_infonce: "
                         f"{list(SUITES['masked_infonce'].sizes)}; supcon-*: "
                         f"{list(SUITES['supcon-all'].sizes)}) or sweep points N<n>xM<m>")
    ap.add_argument("--sweep", choices=["M", "N"],
                    help="scaling sweep instead of --sizes: N 3200 and M 4k..1M, or the reverse")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                    help="address-space limit of each CPU worker (beyond it: recorded as oom)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contenders", default="all", help="comma list, or 'all'")
    ap.add_argument("--bank-grad", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default: 10 GPU, 3 CPU)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds of timed runs per contender")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--allow-missing", action="store_true",
                    help="record contenders this machine lacks (a failed build) as 'unavailable' rows "
                         "instead of stopping (benchmarks/gpu_lease.sh)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _run_worker(args.worker)

    from tqdm import tqdm

    device = torch.device(args.device)
    suite = SUITES[args.loss]
    offered = suite.contenders(device.type)
    names = list(offered) if args.contenders == "all" else args.contenders.split(",")
    unknown = set(names) - set(offered)
    if unknown and not args.allow_missing:
        ap.error(f"unknown contenders on {device.type}: {sorted(unknown)}")
    if "reference" in names:  # the reference runs first: every other contender is compared with it
        names = ["reference"] + [n for n in names if n != "reference"]
    sizes = args.sizes.split(",")
    if args.sweep:
        points = [4096, 16384, 65536, 262144, 1048576]
        sizes = [f"N3200xM{m}" if args.sweep == "M" else f"N{m}xM3200" for m in points]
    grads = {"both": [False, True], "yes": [True], "no": [False]}[args.bank_grad]
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    os.makedirs(args.out, exist_ok=True)
    tv, trv = _versions()
    date = datetime.date.today().isoformat()
    dev_name = _device_name(device)
    for size_name in sizes:
        _size(size_name, args.loss)  # an unknown size stops the run before anything is measured
    rates, rates_line = _rates(device, max(_size(s, args.loss)[2] for s in sizes))
    print(rates_line)
    loss_tag = "" if args.loss == "masked_infonce" else f"{args.loss}-"
    tag = f"{device.type}-{loss_tag}{'sweep' + args.sweep if args.sweep else '-'.join(sizes)}-{date}"
    if args.bank_grad != "both":  # the bank-detached and bank-gradient rows of one size, apart
        tag += {"no": "-detached", "yes": "-bankgrad"}[args.bank_grad]
    csv_path = os.path.join(args.out, f"bench-{tag}.csv")
    with open(csv_path, "w", newline="") as f:
        csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore").writeheader()
    rows = []
    jobs = [(s, g, n) for s in sizes for g in grads for n in names]
    ref_out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size_name, bank_grad, name in tqdm(jobs, desc="benchmark", unit="run"):
            n, m, d, extra = _size(size_name, args.loss)
            if name in unknown:
                result, outputs = dict(status="unavailable"), None
            elif device.type == "cuda":
                try:
                    result, outputs = measure(name, (n, m, d, extra), bank_grad, device, repeats,
                                              args.time_limit, loss=args.loss)
                except torch.OutOfMemoryError:
                    result, outputs = dict(status="oom"), None
                except Exception as e:  # one contender that breaks must not lose the others' rows
                    result, outputs = dict(status="error", note=first_line(e)), None
            else:
                result, outputs = _run_cpu(name, size_name, bank_grad, repeats, args.time_limit, tmp,
                                           args.mem_limit_gb, args.loss)
            if name == "reference":
                ref_out[(size_name, bank_grad)] = outputs
            row = dict(date=date, device=dev_name, torch=tv, triton=trv, loss=args.loss, size=size_name,
                       N=n, M=m, D=d, bank_grad=int(bank_grad), contender=name, **result)
            _add_floor(row, rates)
            if name != "reference":
                row["max_rel_err"] = max_rel_error(outputs, ref_out.get((size_name, bank_grad)))
            rows.append(row)
            # one row at a time: what was measured survives a run that is stopped later
            with open(csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore").writerow(row)
    table = markdown_table(rows)
    title = f"{dev_name}, torch {tv}, triton {trv}, {date}, loss {args.loss}"
    with open(os.path.join(args.out, f"bench-{tag}.md"), "w") as f:
        f.write(f"{title}\n{rates_line}\n\n{table}\n")
    print(f"\nCSV: {csv_path}")
    print(title)
    print(rates_line)
    print(table)


def _rates(device, d=128):
    """The rates the floors use, measured now (a CPU's at feature dim d), and a line that says
    what they are."""
    if device.type == "cuda":
        rates = matrix_rates(device)
        return rates, ("measured matrix rates (TFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
                       + "; floor = matrix work at the row's rate (bf16, tf32, or fp32)")
    threads = os.cpu_count()  # what each CPU worker runs with (_run_worker)
    rates = cpu_rates(threads, d=d)
    return rates, (f"measured on {threads} cores at once, the best of torch.mm and oneDNN at the cpu "
                   f"kernel's tiles ({CPU_BLOCK} x {d} @ {d} x {CPU_TILE}, then @ {CPU_TILE} x {d}) and "
                   f"at 1024-row tiles: fp32 matrix {rates['fp32'] * 1e3:.1f} GFLOP/s, bf16 matrix "
                   f"{rates['bf16_products'] * 1e3:.1f} GFLOP/s (bf16 rows: the larger of the two), exp "
                   f"{rates['exp']:.2f} G/s; floor = matrix work / matrix rate + exponentials / exp rate "
                   "(the loss's counts, design.md §3 or §7; a forward alone: the scores of each pass)")


def _add_floor(row, rates):
    """% of the matrix rate, the floor and the multiple of it, for a row measured with `rates`."""
    if row.get("status") != "ok":
        return
    dtype, name = row.get("dtype", ""), row["contender"]
    rate = rates.get("bf16" if dtype == "bfloat16" else "tf32" if "tf32" in name else "fp32")
    if not rate:
        return
    row["pct_matrix_rate"] = 100 * row["tflops"] / rate
    row["matrix_rate_tflops"] = rate
    row["exp_rate_g"] = rates.get("exp")
    row["floor_ms"] = floor_ms(row["N"], row["M"], row["D"], row["bank_grad"], row.get("timed") != "fwd",
                               rate, rates.get("exp"), loss=row.get("loss") or "masked_infonce")
    row["x_floor"] = row["time_ms"] / row["floor_ms"]


def _fmt(x, spec):
    return "-" if x is None or x != x else format(x, spec)


def markdown_table(rows):
    """One line per row; what a row timed (forward+backward, or the forward alone where the
    contender refused the backward) in its own column, and the rows' notes listed under the table."""
    head = ("| size | bank grad | contender | dtype | ms | peak extra MB | TFLOP/s | % matrix rate "
            "| x floor | max rel err | timed |")
    lines = [head, "|" + "---|" * 11]
    notes = []
    for r in rows:
        if r.get("loss") not in (None, "", "masked_infonce"):  # say which loss the row measured
            r = dict(r, size=f"{r['size']} ({r['loss']})")
        note = r.get("note") or ""
        mark = ""
        if note:
            if note not in notes:
                notes.append(note)
            mark = f" [{notes.index(note) + 1}]"
        if r.get("status") != "ok":
            lines.append(f"| {r['size']} | {'yes' if r['bank_grad'] else 'no'} | {r['contender']}{mark} | - | "
                         f"{r.get('status')} | - | - | - | - | - | - |")
            continue
        timed = {"fwd": "fwd only", "fwd+bwd": "fwd+bwd"}.get(r.get("timed") or "fwd+bwd", r.get("timed"))
        lines.append(
            f"| {r['size']} | {'yes' if r['bank_grad'] else 'no'} | {r['contender']}{mark} | {r['dtype']} | "
            f"{_fmt(r['time_ms'], '.1f')} | {_fmt(r['peak_extra_mb'], '.1f')} | {_fmt(r.get('tflops'), '.2f')} | "
            f"{_fmt(r.get('pct_matrix_rate'), '.1f')} | {_fmt(r.get('x_floor'), '.1f')} | "
            f"{_fmt(r.get('max_rel_err'), '.1e')} | {timed} |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
