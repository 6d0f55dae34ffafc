"""The tree follows the style configured in pyproject.toml ([tool.ruff])."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('command', [['format', '--check'], ['check']])
def test_ruff_is_clean(command):
  run = subprocess.run(
    [sys.executable, '-m', 'ruff', *command, '.'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert run.returncode == 0, run.stdout + run.stderr
