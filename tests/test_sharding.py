"""Sharded params on 8 forced host devices (in a subprocess: the device
count is fixed when JAX starts)."""

import os
import pathlib
import subprocess
import sys


def test_sharded_quantize_and_inference():
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root))
  result = subprocess.run(
    [sys.executable, str(root / 'tests' / 'sharded_script.py')],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'SHARDING OK' in result.stdout
