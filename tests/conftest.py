"""Shared fixtures: keep JAX on CPU-friendly defaults for the test suite."""

import os

import jax
import pytest

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


@pytest.fixture(autouse=True)
def _keep_compile_caches(monkeypatch):
  """`lqer eval` clears JAX's compile caches before each row's quantization
  so its offline seconds are a cold pass (lqer.cli.tasks.quantize). Tests
  time nothing, so each row keeps what the earlier rows compiled (the same
  model's forward, the same quantizers) instead of compiling it again."""
  monkeypatch.setattr(jax, 'clear_caches', lambda: None)
