"""The README stays true: every setting is documented, and its test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`ALBERT_{name.upper()}`" in readme, f"ALBERT_{name.upper()} is missing from the README"
        assert f"`--{name.replace('_', '-')}`" in readme


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    quickstart = readme.split("## Calling it")[0]
    for command in ("pip install -e '.[test]'", "python -m pytest -q"):
        assert command in quickstart and command in ci
    assert re.search(r"^albert-serve\b", quickstart, re.MULTILINE)
