"""Compiled kernels: the int4 CPU matmul, an XLA FFI custom call
(`int4_kernel.cc`, built at `pip install -e .`; `ffi` is its JAX binding
and says why when it is unavailable)."""
