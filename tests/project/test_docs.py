"""The README and the docs: every Python block runs as written, the README starts with the two commands and
stays short, the site builds with warnings as errors, and nothing cites a file outside the repository."""

import glob
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _python_blocks(path):
    return re.findall(r"```python\n(.*?)```", open(path).read(), re.S)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_python_blocks_run(path):
    for code in _python_blocks(path):
        exec(compile(code, path, "exec"), {})


def test_the_examples_are_there():
    assert len(_python_blocks(PAGES[0])) >= 2  # the ops and a drop-in loss
    assert sum(len(_python_blocks(p)) for p in PAGES[1:]) >= 2


def test_readme_starts_with_the_two_commands_and_is_short():
    lines = open(PAGES[0]).read().splitlines()
    block = lines[lines.index("```bash") + 1 :][:2]
    assert block[0].startswith("bash scripts/setup.sh && .venv/bin/fpo demo")
    assert block[1].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
    assert len(lines) <= 200


def test_site_builds_with_warnings_as_errors(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    api = open(tmp_path / "site" / "api" / "index.html").read()
    assert "sae_feature_mse" in api and "ref_indices" in api  # the reference is generated from the docstrings


def test_nothing_cites_a_design_file_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    texts = [f for f in tracked if f.endswith((".py", ".md", ".sh", ".toml", ".yml"))]
    cites = [f for f in texts if "DESIGN.md" in open(os.path.join(ROOT, f), errors="replace").read()]
    assert cites == [f for f in cites if f == "tests/project/test_docs.py"]


def test_contributing_names_every_module():
    """CONTRIBUTING's tree is the one map of the code: every module of fpo and fpo_kernels has its line there."""
    root = os.path.dirname(PAGES[0])
    text = open(os.path.join(root, "CONTRIBUTING.md")).read()
    tree = text[text.index("## The tree") :]
    missing = []
    for package in ("fpo_kernels", "fpo"):
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), os.path.join(root, package))
                if not any(line.split()[:1] == [rel] for line in tree.splitlines() if line.startswith("  ")):
                    missing.append(f"{package}/{rel}")
    assert not missing, f"modules missing from CONTRIBUTING.md's tree: {missing}"
    for page in sorted(os.listdir(os.path.join(root, "docs"))):
        if page.endswith(".md"):
            text = re.sub(r"```.*?```", "", open(os.path.join(root, "docs", page)).read(), flags=re.S)  # not code
            heads = [x for x in text.splitlines() if x.startswith("# ")]
            assert len(heads) == 1, f"docs/{page} has {len(heads)} '# ' headings"
