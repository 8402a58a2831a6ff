"""The README's Python examples run as written."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, README, "exec"), {"__name__": "readme"})
