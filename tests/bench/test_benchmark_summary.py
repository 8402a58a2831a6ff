"""benchmarks.summary, the table of a GPU lease's summary, on a CSV the GPU benchmark wrote."""
import os

from benchmarks import summary
from paths import ROOT

CSV = os.path.join(ROOT, "benchmarks", "results", "h200-2026-11-27-run2.csv")


def test_summary_of_a_gpu_run(capsys, tmp_path):
    summary.main([CSV])
    out = capsys.readouterr().out.splitlines()
    with open(CSV) as f:
        n_rows = sum(1 for _ in f) - 1
    assert out[0].startswith("NVIDIA H200, torch 2.11.0+cu130")
    assert len(out) == 1 + 2 + n_rows  # title, table head, one line per row
    assert "| paper | no | reference | float32 | 17.9 | 5338.0 |" in out[3]
    assert any("| large | yes | triton-bf16 | bfloat16 | 21.1 |" in line for line in out)


def test_summary_of_an_empty_folder(capsys, tmp_path):
    summary.main([str(tmp_path)])
    assert "no rows measured" in capsys.readouterr().out
