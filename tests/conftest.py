"""Shared fixtures: keep JAX on CPU-friendly defaults for the test suite."""

import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
