"""The README's Python examples run as written."""
import os
import re

from paths import ROOT

README = os.path.join(ROOT, "README.md")


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, README, "exec"), {"__name__": "readme"})


# what the layout need not list: package markers, generated and tool files
UNLISTED = {"__init__.py", "__pycache__", "conftest.py", "setup.cfg"}


def _layout():
    text = open(README).read()
    return re.search(r"## Layout\n\n```\n(.*?)```", text, flags=re.S).group(1)


def _entries(folder, suffixes=None):
    path = os.path.join(ROOT, folder)
    for name in sorted(os.listdir(path)):
        if name in UNLISTED or name.startswith(".") or name.endswith((".egg-info", ".so")):
            continue
        if name in ("build", "runs") and folder == "":
            continue  # build outputs and training runs
        if suffixes is None or name.endswith(suffixes):
            yield name


def test_readme_layout_matches_the_tree():
    layout = _layout()
    words = set(re.findall(r"[\w.-]+", layout))
    missing = []
    for folder, suffixes, stems in (("", None, False), ("cdcl_ops", ".py", False),
                                    ("cdcl_ops/backends", ".py", False), ("benchmarks", None, False),
                                    ("experiments", None, False), ("docs", ".md", False),
                                    ("cdcl_nuclei", ".py", True), ("tests", None, False)):
        for name in _entries(folder, suffixes):
            key = name.removesuffix(".py") if stems else name
            if key not in words and name + "/" not in layout:
                missing.append(os.path.join(folder, name))
    assert not missing, f"README layout does not list {missing}"
    # and nothing it names is gone
    for name in re.findall(r"\b[\w-]+\.(?:py|sh|md|toml|txt)\b", layout):
        hits = [d for d, _, files in os.walk(ROOT) if name in files and ".venv" not in d]
        assert hits, f"README layout names {name}, which is not in the tree"
