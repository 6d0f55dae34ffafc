"""Builds lqer's int4 CPU kernel during `pip install` (also `-e .`).

Everything else is declared in pyproject.toml. Where the kernel cannot be
built (no compiler, not Linux, no jaxlib headers) the install goes on
without it and lqer runs its XLA packed path, saying why once at run time
(`lqer.kernels.ffi.unavailable_reason()`).
"""

import glob
import importlib.util
import os
import subprocess

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

_HERE = os.path.dirname(os.path.abspath(__file__))


def _build_module():
  """lqer/kernels/build.py, loaded without importing lqer (or jax)."""
  path = os.path.join(_HERE, 'lqer', 'kernels', 'build.py')
  spec = importlib.util.spec_from_file_location('_lqer_kernel_build', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _BuildKernel(build_ext):
  """Compiles the kernel with build.compile_command; never fails the
  install."""

  def build_extension(self, ext):
    out = self.get_ext_fullpath(ext.name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
      build = _build_module()
      subprocess.run(
        build.compile_command(out), check=True, capture_output=True, text=True
      )
    except Exception as e:  # pylint: disable=broad-except
      detail = getattr(e, 'stderr', '') or e
      print(
        f'lqer: int4 CPU kernel not built ({detail}); lqer will use its'
        ' XLA packed path'
      )
      self.extensions = [x for x in self.extensions if x is not ext]


setup(
  ext_modules=[
    Extension(
      'lqer.kernels._int4_kernel',
      ['lqer/kernels/int4_kernel.cc'],
      depends=sorted(glob.glob('lqer/kernels/*.h')),
    )
  ],
  cmdclass={'build_ext': _BuildKernel},
)
