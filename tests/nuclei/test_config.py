"""The settings of cdcl-train / cdcl-predict as defined in cdcl_nuclei/config.py: the command line
and the --config file read the same definitions, flags override the file, a bad file is one line
naming the file and the key, and the resume check compares exactly the settings not marked free."""
import json
from dataclasses import fields

import pytest

from cdcl_nuclei import cli_predict, cli_train, config
from cdcl_nuclei.checkpoint import load_checkpoint
from nuclei_scripts import TINY
from nuclei_scripts import assert_same_state as _assert_same_state


def test_defaults_and_flags_parse_into_the_dataclass():
    s, names = config.parse(config.TrainConfig, [])
    assert s == config.TrainConfig()
    assert names["max_images"] == "--max-images"
    s, _ = config.parse(config.TrainConfig, ["--no-flips", "--scale-range", "0.5", "2", "--contr", "--lr", "0.01",
                                             "--resize", "--max-images", "3"])
    assert (s.flips, s.scale_range, s.contr, s.lr, s.resize, s.max_images) == (False, (0.5, 2.0), True, 0.01,
                                                                                True, 3)


def test_flags_override_the_file_and_errors_name_the_source(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.5, "epochs": 3, "scale_range": [0.9, 1.1], "cons": False, "model": {}}))
    s, names = config.parse(config.TrainConfig, ["--config", str(f), "--epochs", "7"])
    assert (s.lr, s.epochs, s.scale_range, s.cons) == (0.5, 7, (0.9, 1.1), False)
    assert names["lr"] == f"{f}: lr" and names["epochs"] == "--epochs" and names["seed"] == "--seed"
    # a range is checked where the value came from
    f.write_text(json.dumps({"epochs": 0}))
    with pytest.raises(ValueError, match=f"^{f}: epochs: expected a finite number >= 1, got 0$"):
        config.resolve_training(*config.parse(config.TrainConfig, ["--config", str(f)]))
    config.resolve_training(*config.parse(config.TrainConfig, ["--config", str(f), "--epochs", "2"]))


def test_resolved_run_leaves_the_settings_unchanged():
    s, names = config.parse(config.TrainConfig, ["--method", "meanteacher", "--data", "."])
    run = config.resolve_training(s, names)
    assert (s.cons, s.contr, s.ent, s.rampup_epochs, s.data) == (None, None, None, None, ".")
    r = run.settings
    assert (r.cons, r.contr, r.ent, r.rampup_epochs) == (True, False, True, 80.0) and r.data.startswith("/")
    stored = run.stored()
    assert set(stored) == {f.name for f in fields(config.TrainConfig)} | {"model", "inference"}
    assert stored["scale_range"] == [0.8, 1.25] and stored["inference"]["window"] == 256


def test_resume_compares_every_setting_not_marked_free():
    checked = config.resume_checked()
    free = {f.name for f in fields(config.TrainConfig) if config.spec_of(f).resume_free}
    assert free == {"out", "threads", "no_progress", "stop_after_epochs", "device", "resume", "overlays", "no_test",
                    "test", "instances", "otsu_side"}
    assert set(checked) == {f.name for f in fields(config.TrainConfig)} - free | {"model", "inference"}
    assert checked["model"] == "--preset/--input-size/--target"
    assert checked["inference"] == "--window/--overlap/--flips/--resize"
    assert checked["w_contr"] == "--w-contr"


def test_a_runs_config_json_repeats_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_train.main(TINY + ["--method", "cdcl", "--epochs", "1", "--no-test", "--out", str(a)]) == 0
    assert cli_train.main(["--config", str(a / "config.json"), "--out", str(b)]) == 0
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    for key in ("student", "teacher", "optimizer", "scheduler", "loss", "rng", "best_dice", "epoch", "step"):
        _assert_same_state(sa[key], sb[key], key)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca.pop("out") == str(a) and cb.pop("out") == str(b)
    assert ca == cb


BAD_FILES = [
    ({"bogus": 1}, "bogus", "unknown setting"),
    ({"epochs": "ten"}, "epochs", "expected an integer"),
    ({"epochs": 2.5}, "epochs", "expected an integer"),
    ({"lr": True}, "lr", "expected a number"),
    ({"method": "magic"}, "method", "expected one of"),
    ({"scale_range": [1.0]}, "scale_range", "expected a list of 2 numbers"),
    ({"flips": None}, "flips", "expected true or false"),
    ({"temperature": 0}, "temperature", "expected a finite number > 0"),
    ({"input_size": 100}, "input_size", "expected a multiple of 64"),
    ({"labeled_fraction": "3/2"}, "labeled_fraction", "(0, 1]"),
]


@pytest.mark.parametrize("content,key,why", BAD_FILES, ids=[b[1] + "-" + b[2] for b in BAD_FILES])
def test_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, content, key, why):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(content))
    # a short run's flags, less the one the file sets (a flag would override it)
    i = TINY.index(config.flag(key)) if config.flag(key) in TINY else len(TINY)
    short = TINY[:i] + TINY[i + 2:] + (["--epochs", "1"] if key != "epochs" else [])
    assert cli_train.main(short + ["--config", str(f), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {f}: {key}: ") and why in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text,why", [("{", "not a readable JSON file"), ("[1, 2]", "expected a JSON object")])
def test_config_file_that_is_not_a_json_object(tmp_path, capsys, text, why):
    f = tmp_path / "settings.json"
    f.write_text(text)
    assert cli_train.main(["--config", str(f), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(f) in err and why in err, err
    assert cli_train.main(["--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config" in err and "missing.json" in err, err


def test_predict_settings_from_a_file_and_its_required_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_predict.main(["--images", str(tmp_path)])
    assert e.value.code == 2
    assert "--checkpoint, --out" in capsys.readouterr().err
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"checkpoint": str(tmp_path / "none.pt"), "images": str(tmp_path),
                             "out": str(tmp_path / "o"), "batch": 4}))
    assert cli_predict.main(["--config", str(f)]) == 2  # the settings are complete; the checkpoint is missing
    assert "none.pt: checkpoint file not found" in capsys.readouterr().err
    # --images takes several paths; a file may give one or a list of them
    f.write_text(json.dumps({"checkpoint": "c.pt", "images": ["a", "b/*.png"], "out": "o"}))
    assert config.parse(config.PredictConfig, ["--config", str(f)])[0].images == ("a", "b/*.png")
    assert config.parse(config.PredictConfig, ["--config", str(f), "x", "y"])[0].images == ("x", "y")
    for bad in ([], [1], 3):
        f.write_text(json.dumps({"images": bad}))
        with pytest.raises(ValueError, match="images: expected a string or a non-empty list of them"):
            config.parse(config.PredictConfig, ["--config", str(f)])
    f.write_text(json.dumps({"batch": "4"}))
    assert cli_predict.main(["--config", str(f)]) == 2
    assert f"{f}: batch: expected an integer" in capsys.readouterr().err
