"""The scripts that choose the demo's decoding and training budget on the validation split
(experiments/tune_instances.py, experiments/demo_budget.py), on tiny runs."""
import csv
import json

import pytest

from cdcl_nuclei import cli_train, instances
from experiments import demo_budget, tune_instances
from nuclei_scripts import SAMPLE, TINY, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished one-epoch CDCL runs of one split (seeds 0 and 1), named as demo_budget.sh names them."""
    folder = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        out = folder / f"e1-seed{seed}"
        assert cli_train.main(TINY + ["--method", "cdcl", "--epochs", "1", "--seed", str(seed), "--no-test",
                                      "--overlays", "0", "--out", str(out)]) == 0
        (out / "done").touch()
    return folder


def test_the_decoding_is_chosen_over_runs_among_those_that_keep_every_component(runs, tmp_path, capsys):
    out = tmp_path / "res" / "e1"
    ckpts = [str(runs / f"e1-seed{s}" / "best.pt") for s in (0, 1)]
    tune_instances.main(["--checkpoint", *ckpts, "--out", str(out), "--threads", "1"])
    res = json.loads((out / "validation-seed0-1.json").read_text())
    val = json.loads((runs / "e1-seed0" / "splits.json").read_text())["val"]
    assert res["images"] == val and len(res["rows"]) == len(tune_instances.grid())
    for r in res["rows"]:  # each metric the mean over the two runs
        assert len(r["per_run"]) == 2
        assert r["keeps_every_component"] == instances.Decoding(**r["decoding"]).keeps_every_component
        for part in ("over_set", "per_image_mean"):
            for k in tune_instances.GOAL:
                assert r["summary"][part][k] == pytest.approx((r["per_run"][0][part][k] + r["per_run"][1][part][k]) / 2)
    eligible = [r for r in res["rows"] if r["keeps_every_component"]]
    assert res["chosen"] == max(eligible, key=lambda r: r["goal"])["decoding"]
    assert res["best_of_all"] == max(res["rows"], key=lambda r: r["goal"])["decoding"]
    assert any(not r["keeps_every_component"] for r in res["rows"])  # the rule has something to exclude
    md = (out / "validation-seed0-1.md").read_text()
    assert "Otsu + watershed" in md and "(d) method=watershed" in md
    assert "chosen on validation" in capsys.readouterr().out

    # the mean teacher is scored on request; a run of another split is refused
    tune_instances.main(["--checkpoint", ckpts[0], "--net", "teacher", "--out", str(out), "--threads", "1"])
    assert "teacher" in (out / "validation-seed0-teacher.md").read_text()
    other = tmp_path / "other"
    assert cli_train.main(TINY + ["--method", "suponly", "--epochs", "1", "--split-seed", "1", "--no-test",
                                  "--overlays", "0", "--out", str(other)]) == 0
    with pytest.raises(SystemExit, match="another split"):
        tune_instances.main(["--checkpoint", ckpts[0], str(other / "best.pt"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no validation image is left"):  # the runs' images are the sample's
        tune_instances.main(["--checkpoint", ckpts[0], "--exclude", str(SAMPLE), "--out", str(out)])
    with pytest.raises(SystemExit, match="no teacher"):
        tune_instances.main(["--checkpoint", str(other / "best.pt"), "--net", "teacher", "--out", str(out)])

    # the test split, once per run, and the control: Otsu's foreground with the model's decoding
    tune_instances.main(["--checkpoint", *ckpts, "--out", str(out), "--test", "--threads", "1"])
    test = json.loads((out / "test-seed1.json").read_text())
    control = json.loads((out / "test-otsu-model-decoding.json").read_text())
    assert test["decoding"]["model"] == instances.DEFAULT.describe() == control["decoding"]
    assert control["images"] == json.loads((runs / "e1-seed0" / "splits.json").read_text())["test"]
    assert set(control["summary"]["over_set"]) >= set(tune_instances.GOAL)

    # the budgets side by side: every finished run's best validation Dice and the tuned decodings
    (runs / "e2-seed0").mkdir(exist_ok=True)  # unfinished: left out
    assert demo_budget.main(["--runs", str(runs), "--out", str(tmp_path / "res")]) == 0
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert list(summary) == ["1"] and summary["1"]["seeds"] == [0, 1]
    best = [max(float(r["val_dice"]) for r in csv.DictReader(open(runs / f"e1-seed{s}" / "log.csv")))
            for s in (0, 1)]
    assert summary["1"]["best_val_dice"] == pytest.approx(sum(best) / 2)
    assert summary["1"]["chosen"] == res["chosen"]
    assert "| 1 | 0, 1 |" in (tmp_path / "res" / "results.md").read_text()
    assert demo_budget.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def _tune(path, goals, classical=0.5):
    """A tune_instances result whose decodings score `goals` ({Decoding: goal mean})."""
    summary = {part: dict.fromkeys(tune_instances.GOAL, classical) for part in ("over_set", "per_image_mean")}
    path.write_text(json.dumps({"checkpoint": [str(path)], "machine": "m", "date": "d", "classical": {
        "watershed": summary}, "rows": [{"decoding": d.describe(), "goal": g} for d, g in goals.items()]}))
    return str(path)


def test_one_decoding_is_chosen_on_the_mean_over_validation_splits(tmp_path, capsys):
    from experiments import choose_decoding

    keep, drop = instances.Decoding(unmarked="keep", h=0.5), instances.Decoding(unmarked="drop", h=0.5)
    prob = instances.Decoding(surface="probability", h=0.01)
    # prob wins split 1 and drop split 2; keep wins the mean
    a = _tune(tmp_path / "a.json", {keep: 0.70, drop: 0.62, prob: 0.74})
    b = _tune(tmp_path / "b.json", {keep: 0.58, drop: 0.60, prob: 0.52, instances.CLASSICAL: 0.1})
    assert choose_decoding.main([a, b, "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "choice.json").read_text())
    assert res["chosen"] == keep.describe() and len(res["rows"]) == 3  # CLASSICAL is not in both: left out
    assert [r["mean"] for r in res["rows"]] == pytest.approx([0.64, 0.63, 0.61])
    # a decoding that drops components may win
    b = _tune(tmp_path / "b.json", {keep: 0.58, drop: 0.70, prob: 0.52})
    assert choose_decoding.main([a, b, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "choice.json").read_text())["chosen"] == drop.describe()
    assert res["classical"] == pytest.approx([0.5, 0.5])
    md = (tmp_path / "out" / "choice.md").read_text()
    assert "(d) method=watershed" in md and "Otsu + watershed" in md and "| 70.00 | 58.00 | 64.00 |" in md
    assert "chosen:" in capsys.readouterr().out
    assert choose_decoding.main([a, str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    c = _tune(tmp_path / "c.json", {instances.CLASSICAL: 0.3})
    assert choose_decoding.main([a, c, "--out", str(tmp_path / "x")]) == 2
    assert "share no decoding" in capsys.readouterr().err


def test_table1_instance_metrics_under_two_decodings(tmp_path, capsys):
    from experiments import table1_decodings

    def results(path, aji, methods=("suponly", "cdcl")):
        runs = [{"method": m, "seed": s, "aji_set": aji + s, "aji_image": 1.0, "pq_set": 2.0, "f1_set": 3.0,
                 "dsb_set": 4.0, **{f"components_{c}": 0.5 for c, _ in table1_decodings.COLUMNS},
                 **{f"otsu_{c}": 9.0 for c, _ in table1_decodings.COLUMNS}} for m in methods for s in (0, 1)]
        path.write_text(json.dumps({"runs": runs}))
        return str(path)

    old, new = results(tmp_path / "old.json", 10.0), results(tmp_path / "new.json", 20.0)
    assert table1_decodings.main(["--old", old, "--new", new, "--out", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "| cdcl, decoding of 2026-12-04 | 10.50 ± 0.71 |" in md
    assert "| cdcl, decoding of 2026-12-05 | 20.50 ± 0.71 |" in md
    assert "| suponly, components | 0.50 ± 0.00 |" in md and "| Otsu + watershed (no learning) | 9.00 |" in md
    fewer = results(tmp_path / "fewer.json", 20.0, ("cdcl",))
    assert table1_decodings.main(["--old", old, "--new", fewer, "--out", str(tmp_path / "t.md")]) == 2
    missing = str(tmp_path / "none.json")
    assert table1_decodings.main(["--old", missing, "--new", new, "--out", str(tmp_path / "t.md")]) == 2
    assert "different runs" in capsys.readouterr().err
