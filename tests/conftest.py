"""Shared fixtures: keep JAX on CPU-friendly defaults for the test suite."""

import os

# Two thirds of the tests' time is XLA:CPU compiling small programs, each
# then run for milliseconds (timing jax's backend_compile over half the
# suite: 10,328 compiles, 708 s of 1,070). The tests compile with LLVM's
# backend optimization at level 0: the suite runs ~25 % faster (1071 s ->
# 810 s on 2 cores). XLA's HLO passes and fusions stay the same; what
# changes is how fast the generated code runs and, in the last bit, float
# results (on a sample: level 1 matched the default level bit for bit,
# level 0 did not), which the tests' tolerances allow. Subprocesses inherit
# it.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
).strip()
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(autouse=True)
def _keep_compile_caches(monkeypatch):
  """`lqer eval` clears JAX's compile caches before each row's quantization
  so its offline seconds are a cold pass (lqer.cli.tasks.quantize). Tests
  time nothing, so each row keeps what the earlier rows compiled (the same
  model's forward, the same quantizers) instead of compiling it again."""
  monkeypatch.setattr(jax, 'clear_caches', lambda: None)
