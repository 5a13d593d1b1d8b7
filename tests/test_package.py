"""Package-level contracts: import hygiene and layering."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_flowgrad_pulls_no_heavy_optional_modules():
    code = ("import sys, flowgrad, flowgrad.clip_guidance; "
            "bad = [m for m in ('h5py', 'sklearn', 'open_clip', 'matplotlib', 'click', 'directions', 'cli')"
            " if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_go_one_way_and_third_party_modules_stay_in_their_rooms():
    rooms = {"h5py": {"directions/store.py"}, "sklearn": None, "open_clip": {"flowgrad/clip_guidance.py"},
             "click": None, "tqdm": None, "matplotlib": None}
    for path in ROOT.glob("*/**/*.py"):
        rel = path.relative_to(ROOT).as_posix()
        top = rel.split("/")[0]
        if top not in ("flowgrad", "directions", "cli"):
            continue
        names = _imports(path)
        if top == "flowgrad":
            assert not names & {"directions", "cli"}, rel
        if top == "directions":
            assert "cli" not in names, rel
        for mod, allowed in rooms.items():
            if mod in names:
                if allowed is not None:
                    assert rel in allowed, f"{mod} imported in {rel}"
                elif mod == "sklearn":
                    assert top == "directions", f"sklearn imported in {rel}"
                else:
                    assert top == "cli", f"{mod} imported in {rel}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest -q'
    assert command in readme and command in ci
    assert "discover-directions --attr old" in readme
