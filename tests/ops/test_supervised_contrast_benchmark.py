"""The supervised contrastive loss's benchmark (benchmarks/supcon_contenders.py, run with
`python -m benchmarks.run --loss supcon-all|supcon-negatives`): its work counts and floor, a tiny
run of its CPU contenders against the reference, and the GPU script's rows for it."""
import csv
import math
import os

import pytest

import cdcl_ops
import paths
from benchmarks import run, supcon_contenders
from benchmarks.measure import floor_ms
from benchmarks.suites import SUITES

ROOT = str(paths.ROOT)
needs_cpu = pytest.mark.skipif("cpu" not in cdcl_ops.available_backends("cpu", loss="supervised_contrast"),
                               reason="cdcl_ops._C not built")


def test_work_counts_and_floor():
    n, m, d = 1000, 3000, 256
    all_, neg = SUITES["supcon-all"], SUITES["supcon-negatives"]
    # "all": scores, O and the positives' rows; "negatives": two passes of scores and a product
    assert all_.flops(n, m, d, False) == 6 * n * m * d and neg.flops(n, m, d, False) == 8 * n * m * d
    assert all_.flops(n, m, d, True) == 10 * n * m * d and neg.flops(n, m, d, True) == 12 * n * m * d
    assert all_.flops(n, m, d, True, backward=False) == 2 * n * m * d
    assert neg.flops(n, m, d, True, backward=False) == 4 * n * m * d
    assert all_.exponentials(n, m, False) == n * m and neg.exponentials(n, m, True) == 3 * n * m
    cpu = floor_ms(n, m, d, True, True, matrix_tflops=0.1, exp_g=2.0, loss="supcon-negatives")
    assert math.isclose(cpu, (12 * n * m * d / 0.1e12 + 3 * n * m / 2e9) * 1e3)
    assert SUITES["supcon-all"].size("contrastiveseg") == (16_384, 95_000, 256, 19)
    inp = supcon_contenders.make_inputs(40, 95, 8, 19, "cpu")
    assert inp["bank_labels"].tolist() == sorted(inp["bank_labels"].tolist())  # one block per class
    assert set(inp["bank_labels"].tolist()) == set(range(19))


@needs_cpu
def test_tiny_run_agrees_with_the_reference_and_prints_floor_multiples(tmp_path, capsys):
    names = ["reference", "cpu", "cpu-bf16"] + (
        ["supconloss"] if "supconloss" in SUITES["supcon-all"].contenders("cpu") else [])
    run.main(["--loss", "supcon-all", "--device", "cpu", "--sizes", "N70xM190",
              "--contenders", ",".join(names), "--bank-grad", "yes", "--repeats", "1",
              "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "loss supcon-all" in out and "| N70xM190 (supcon-all) | yes | cpu | float32 |" in out
    [csv_path] = [p for p in os.listdir(tmp_path) if p.endswith(".csv")]
    assert "supcon-all" in csv_path
    with open(tmp_path / csv_path) as f:
        rows = {r["contender"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names)
    for name, r in rows.items():
        assert r["status"] == "ok" and r["loss"] == "supcon-all", r
        assert math.isclose(float(r["x_floor"]), float(r["time_ms"]) / float(r["floor_ms"]))
        if name != "reference":
            assert float(r["max_rel_err"]) < (2e-2 if name == "cpu-bf16" else 1e-4), r


def test_unknown_sizes_and_contenders_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown size 'large'"):
        run.main(["--loss", "supcon-negatives", "--device", "cpu", "--sizes", "large", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's error: SupConLoss computes the "all" loss only
        run.main(["--loss", "supcon-negatives", "--device", "cpu", "--sizes", "tiny",
                  "--contenders", "supconloss", "--out", str(tmp_path)])


def test_gpu_lease_benchmarks_the_loss_with_names_known_on_a_gpu(monkeypatch):
    from benchmarks import lease

    names = lease.SUPCON_CONTENDERS.split(",")
    monkeypatch.setattr(cdcl_ops, "available_backends", lambda device, loss=None: ["reference", "chunked", "triton"])
    offered = supcon_contenders.contenders("cuda", "all")
    assert set(names) <= set(offered)
    assert names[0] == "reference" and "triton-bf16" in names and "supconloss" in names
    assert "bench-supcon" in [s.name for s in lease.PLAN] and "bench-supcon" in lease.IF_TIME
