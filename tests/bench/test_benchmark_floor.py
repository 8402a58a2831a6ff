"""The benchmark's floor (each row's time as a multiple of what the machine can do) and its
`flex` contender, which on a CPU runs the forward alone and says so (benchmarks/, design.md §6)."""
import csv
import math
import os
import re

import pytest
import torch

import cdcl_ops
from benchmarks import run, summary
from benchmarks.contenders import _flex_api, contenders, exponentials, flops, make_inputs, reference_eager
from benchmarks.measure import CPU_BLOCK, CPU_TILE, cpu_rates, floor_ms, max_rel_error, measure
from cdcl_ops.backends import native
from paths import ROOT

needs_flex = pytest.mark.skipif(_flex_api() is None, reason="no FlexAttention in this torch")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_the_floor_uses_the_cpu_kernels_own_tile():
    with open(os.path.join(ROOT, "csrc", "cpu", "tiles.h")) as f:
        src = f.read()
    const = {k: int(v) for k, v in re.findall(r"inline constexpr int64_t (\w+) = (\d+);", src)}
    assert (const["FWD_QUERY_BLOCK"], const["FWD_BANK_TILE"]) == (CPU_BLOCK, CPU_TILE)
    assert (const["GRAD_BANK_BLOCK"], const["GRAD_QUERY_TILE"]) == (CPU_BLOCK, CPU_TILE)


def test_floor_counts():
    n, m, d = 1000, 3000, 128
    assert flops(n, m, d, False) == 4 * n * m * d and flops(n, m, d, True) == 8 * n * m * d
    assert flops(n, m, d, True, backward=False) == 2 * n * m * d  # a forward alone needs no O
    assert exponentials(n, m, False) == n * m and exponentials(n, m, True) == 2 * n * m
    assert exponentials(n, m, True, backward=False) == n * m
    # a CPU: matrix time + exp time (one set of vector units does both)
    cpu = floor_ms(n, m, d, True, True, matrix_tflops=0.1, exp_g=2.0)
    assert math.isclose(cpu, (8 * n * m * d / 0.1e12 + 2 * n * m / 2e9) * 1e3)
    # a GPU: the matrix work alone
    assert math.isclose(floor_ms(n, m, d, False, True, matrix_tflops=800.0), 4 * n * m * d / 800e12 * 1e3)


def test_cpu_rates_are_measured_on_all_cores():
    rates = cpu_rates(threads=2, rounds=1)
    assert set(rates["detail"]) >= {"fp32-blas-64x256", "bf16_products-blas-1024x1024", "exp"}
    assert rates["fp32"] == max(v for k, v in rates["detail"].items() if k.startswith("fp32")) / 1e12
    assert 1e-4 < rates["fp32"] < 1e3  # TFLOP/s
    assert 1e-4 < rates["bf16_products"] < 1e3
    assert rates["bf16"] == max(rates["fp32"], rates["bf16_products"])  # bf16 rows may be upcast
    assert 1e-3 < rates["exp"] < 1e4  # 10^9 exp/s


def _row(**kw):
    base = dict(size="paper", bank_grad=0, contender="cpu", dtype="float32", status="ok",
                time_ms=10.0, peak_extra_mb=1.0, tflops=0.1, pct_matrix_rate=50.0, max_rel_err=1e-7)
    return {**base, **kw}


def test_table_says_what_each_row_timed_and_lists_the_notes():
    table = run.markdown_table([
        _row(timed="fwd+bwd", x_floor=2.5),
        _row(contender="flex", timed="fwd", x_floor=40.0, note="forward only, backward refused (X)"),
        _row(contender="flex", bank_grad=1, timed="fwd", note="forward only, backward refused (X)"),
        _row(contender="cuda", status="unavailable"),
        dict(size="paper", bank_grad=0, contender="old", dtype="float32", status="ok", time_ms=1.0,
             peak_extra_mb=1.0),  # a row of a CSV from before the floor: no floor, no timed
    ]).splitlines()
    assert "| x floor |" in table[0] and table[0].endswith("| timed |")
    assert table[2].endswith("| 2.5 | 1.0e-07 | fwd+bwd |")
    assert "| flex [1] |" in table[3] and table[3].endswith("| 40.0 | 1.0e-07 | fwd only |")
    assert "| flex [1] |" in table[4]  # the same note, one footnote
    assert "| unavailable |" in table[5]
    assert table[6].endswith("| - | - | fwd+bwd |")
    assert table[-2:] == ["", "[1] forward only, backward refused (X)"]


@needs_flex
def test_flex_contender_on_cpu_is_forward_only_and_agrees_with_reference():
    result, outputs = measure("flex", (200, 300, 128, 25), True, torch.device("cpu"), repeats=1,
                              time_limit=10)
    assert result["status"] == "ok" and result["timed"] == "fwd"
    assert "backward refused" in result["note"] and "NotImplementedError" in result["note"]
    assert result["tflops"] == pytest.approx(flops(200, 300, 128, True, backward=False)
                                             / (result["time_ms"] * 1e-3) / 1e12)
    assert outputs[1:] == [None, None, None]  # no gradients: nothing to compare but the loss
    inp = make_inputs(200, 300, 128, 25, "cpu")
    with torch.no_grad():
        ref = reference_eager(inp)
    assert max_rel_error(outputs, [ref, None, None, None]) < 1e-6


@needs_flex
def test_flex_loss_of_rows_without_negatives_is_zero_not_nan():
    inp = make_inputs(50, 60, 16, 25, "cpu")
    inp["bank_labels"] = torch.full_like(inp["bank_labels"], -1)  # nobody has a negative
    factory, _ = contenders("cpu")["flex"]
    with torch.no_grad():
        loss = factory()(inp)
    assert loss.item() == 0.0


@needs_flex
def test_benchmark_run_prints_floor_multiples_and_the_flex_row(tmp_path, capsys):
    run.main(["--device", "cpu", "--sizes", "N64xM96", "--contenders", "reference,flex",
              "--bank-grad", "no", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "floor = matrix work / matrix rate + exponentials / exp rate" in out
    [csv_path] = [p for p in os.listdir(tmp_path) if p.endswith(".csv")]
    with open(tmp_path / csv_path) as f:
        rows = {r["contender"]: r for r in csv.DictReader(f)}
    assert rows["reference"]["timed"] == "fwd+bwd" and rows["flex"]["timed"] == "fwd"
    for r in rows.values():
        assert r["status"] == "ok", r
        assert math.isclose(float(r["x_floor"]), float(r["time_ms"]) / float(r["floor_ms"]))
        assert float(r["x_floor"]) > 1.0  # nothing runs faster than the floor
    assert "backward refused" in rows["flex"]["note"]
    assert "| flex [1] | float32 |" in out and "| fwd only |" in out and "[1] forward only" in out
    summary.main([str(tmp_path)])
    assert "| fwd only |" in capsys.readouterr().out


@pytest.mark.skipif("cpu" not in cdcl_ops.available_backends("cpu"), reason="cdcl_ops._C not built")
def test_cpu_bf16_rows_are_measured_against_the_bf16_rate(tmp_path):
    names = ["cpu-bf16"] + (["cpu-bf16-blas"] if native.cpu_products(torch.bfloat16) != "blas" else [])
    assert set(names) <= set(contenders("cpu"))
    run.main(["--device", "cpu", "--sizes", "N70xM300", "--contenders", ",".join(["reference"] + names),
              "--bank-grad", "yes", "--repeats", "1", "--out", str(tmp_path)])
    assert "CDCL_OPS_CPU_PRODUCTS" not in os.environ  # the BLAS contender ran in its own process
    [csv_path] = [p for p in os.listdir(tmp_path) if p.endswith(".csv")]
    with open(tmp_path / csv_path) as f:
        rows = list(csv.DictReader(f))[1:]  # the errors are against the reference's row
    assert [r["contender"] for r in rows] == names
    for r in rows:
        assert r["status"] == "ok" and r["dtype"] == "bfloat16", r
        assert float(r["max_rel_err"]) < 2e-2
        assert math.isclose(float(r["x_floor"]), float(r["time_ms"]) / float(r["floor_ms"]))
