"""pyproject.toml and environment.yml pin the same packages at the same versions."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)\s*", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    project = pins(deps)
    conda = pins((ROOT / "environment.yml").read_text().splitlines())
    assert len(project) == len(deps), "every dependency in pyproject.toml is pinned with =="
    assert project == conda


def test_lock_file_agrees_with_the_direct_pins():
    lock = pins((ROOT / "requirements.lock").read_text().splitlines())
    deps = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert {k: lock.get(k) for k in deps} == deps


def test_command_line_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "glom_mnist", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    for command in ("data", "import-seed", "train", "evaluate", "figures"):
        assert command in out
