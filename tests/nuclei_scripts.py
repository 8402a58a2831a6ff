"""train.py and predict.py loaded once as modules (the tests call their main()), the bundled
sample they train on, and the tiny settings of the application tests' runs."""
import importlib.util

from paths import ROOT

SAMPLE = ROOT / "data" / "dsb2018_sample"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_{name}_script", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = _script("train")
predict = _script("predict")

TINY = ["--data", str(SAMPLE), "--preset", "tiny", "--max-images", "12", "--labeled-fraction", "1/4",
        "--batch-size", "2", "--unlabeled-batch-size", "2", "--iters-per-epoch", "2",
        "--unsup-start-epoch", "1", "--no-progress", "--overlays", "2", "--threads", "1"]
