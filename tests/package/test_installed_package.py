"""The package as a user installs it: a wheel built from a copy of the sources, and a plain
`pip install` of them, each into a fresh virtual environment, imported outside the checkout, with
one forward + backward on the `cpu` backend and an opcheck; from the wheel, the console scripts
cdcl-train and cdcl-predict train and predict on a few bundled images; the sdist carries csrc/."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from paths import ROOT

USE = textwrap.dedent("""
    import os, sys, torch, cdcl_ops
    assert os.path.realpath(cdcl_ops.__file__).startswith(os.path.realpath(sys.prefix)), cdcl_ops.__file__
    assert "cpu" in cdcl_ops.available_backends("cpu"), cdcl_ops.available_backends("cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(37, 5, generator=g, requires_grad=True)
    p, k = torch.randn(37, 5, generator=g), torch.randn(23, 5, generator=g)
    ql, kl = torch.randint(0, 2, (37,), generator=g), torch.randint(0, 2, (23,), generator=g)
    loss = cdcl_ops.masked_infonce(q, p, k, ql, kl, backend="cpu")
    loss.backward()
    ref = cdcl_ops.masked_infonce(q.double(), p.double(), k.double(), ql, kl, backend="reference")
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    assert q.grad is not None and torch.isfinite(q.grad).all()
    from cdcl_ops._validate import canonical_masks
    masks = canonical_masks(ql, kl, None, None, None)
    torch.library.opcheck(torch.ops.cdcl_ops.masked_infonce_fwd,
                          (q.detach().requires_grad_(), p, k, *masks, 10.0, "cpu", 0, "auto", True))
    print("ok", cdcl_ops.__version__)
""")


def _sources(dest: Path) -> Path:
    """The tracked files only, so the build sees what a fresh clone has (no .venv, build/, runs/)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file() and not rel.startswith("data/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs the git checkout")


def _build(src, *what):
    r = subprocess.run([sys.executable, "-m", "build", *what, "--no-isolation", "--outdir", str(src / "dist")],
                       cwd=src, capture_output=True, text=True, env=dict(os.environ, MAX_JOBS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _fresh_venv(tmp_path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # torch and numpy come from this environment (a path entry: its .pth files, among them the
    # editable install of the checkout, are not processed)
    (purelib / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def _pip_install(py, *what):
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--no-index", *what], capture_output=True, text=True, env=dict(os.environ, MAX_JOBS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _use_elsewhere(tmp_path, py):
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([str(py), "-c", USE], cwd=run, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]


def _console_scripts(tmp_path, py):
    """cdcl-train and cdcl-predict of the installed wheel: --help, one tiny training step on
    bundled images and a prediction with its checkpoint, all outside the checkout."""
    run, bin_dir = tmp_path / "scripts", py.parent
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import cdcl_nuclei.cli_train as m; print(m.__file__)"], cwd=run,
                           capture_output=True, text=True, env=env)
    assert os.path.realpath(where.stdout.strip()).startswith(os.path.realpath(py.parent.parent)), where
    for name, words in (("cdcl-train", "--labeled-fraction"), ("cdcl-predict", "--checkpoint")):
        r = subprocess.run([str(bin_dir / name), "--help"], cwd=run, capture_output=True, text=True, env=env)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {name}") and words in r.stdout, r.stderr[-3000:]
    sample = ROOT / "data" / "dsb2018_sample"
    r = subprocess.run([str(bin_dir / "cdcl-train"), "--data", str(sample), "--preset", "tiny", "--max-images", "12",
                        "--labeled-fraction", "1/4", "--batch-size", "2", "--unlabeled-batch-size", "2",
                        "--epochs", "1", "--iters-per-epoch", "1", "--unsup-start-epoch", "1", "--overlays", "0",
                        "--threads", "1", "--no-progress", "--out", "run"],
                       cwd=run, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "model: Dice" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    test_ids = json.loads((run / "run" / "splits.json").read_text())["test"]
    images = run / "images"
    images.mkdir()
    for sid in test_ids[:2]:
        shutil.copy(sample / "images" / f"{sid}.png", images)
    r = subprocess.run([str(bin_dir / "cdcl-predict"), "--checkpoint", "run/best.pt", "--images", "images",
                        "--out", "pred", "--no-progress"], cwd=run, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (run / "pred" / "masks").iterdir()) == sorted(f"{i}.png" for i in test_ids[:2])


@needs_git
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src = _sources(tmp_path / "src")
    _build(src, "--wheel")
    wheels = list((src / "dist").glob("cdcl_ops-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        assert "cdcl_ops/py.typed" in whl.namelist()  # PEP 561: type checkers read the annotations
    py = _fresh_venv(tmp_path)
    _pip_install(py, str(wheels[0]))
    _use_elsewhere(tmp_path, py)
    _console_scripts(tmp_path, py)  # the [train] extra's packages come from this environment


@needs_git
def test_pip_install_of_the_sources_runs_outside_the_checkout(tmp_path):
    # `pip install --no-build-isolation .`, not editable: the package is copied into the venv
    src = _sources(tmp_path / "src")
    py = _fresh_venv(tmp_path)
    _pip_install(py, "--no-build-isolation", str(src))
    _use_elsewhere(tmp_path, py)


@needs_git
def test_sdist_carries_the_native_sources(tmp_path):
    src = _sources(tmp_path / "src")
    _build(src, "--sdist")
    (sdist,) = (src / "dist").glob("cdcl_ops-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert want and want <= names, sorted(want - names)
    assert {"LICENSE", "pyproject.toml", "setup.py"} <= names
