"""The README's Python example runs as written."""

import os
import re


def test_readme_python_examples_run(monkeypatch):
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_starts_with_the_two_commands():
    lines = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().splitlines()
    block = lines[lines.index("```bash") + 1 :][:2]
    assert block[0].startswith("bash scripts/setup.sh && .venv/bin/fpo demo")
    assert block[1].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
