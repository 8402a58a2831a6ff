"""The bundled sample the application tests train on, the tiny settings of their runs, and the
bit-for-bit comparison of two training states, and the one-thread fixture of the modules that
import it."""
import pytest
import torch

from paths import ROOT

SAMPLE = ROOT / "data" / "dsb2018_sample"

TINY = ["--data", str(SAMPLE), "--preset", "tiny", "--max-images", "12", "--labeled-fraction", "1/4",
        "--batch-size", "2", "--unlabeled-batch-size", "2", "--iters-per-epoch", "2",
        "--unsup-start-epoch", "1", "--no-progress", "--overlays", "2", "--threads", "1"]


def assert_same_state(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    else:
        assert a == b, path


@pytest.fixture(autouse=True)
def one_thread():
    """Imported by a test module, runs each of its tests on one torch thread: tiny tensors, where more
    threads only contend on a shared box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
