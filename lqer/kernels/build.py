"""How `int4_kernel.cc` is compiled (setup.py calls `compile_command`).

One translation unit: the .cc includes its parts (the .h files beside it).

No -march flags: every SIMD function in the source carries its own
`__attribute__((target(...)))` and the instruction set is picked at run time
by cpuid, so one library runs on any x86-64 CPU (scalar code where AVX2 is
missing). The XLA FFI headers come from the installed jaxlib
(`jax.ffi.include_dir()`), found without importing jax.
"""

import importlib.util
import os
import shutil
import sys

SOURCE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), 'int4_kernel.cc'
)


class BuildError(RuntimeError):
  """The library cannot be built here (no compiler, platform, headers)."""


def include_dir() -> str:
  """jaxlib's include directory (what `jax.ffi.include_dir()` returns)."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or spec.origin is None:
    raise BuildError('jaxlib is not installed: no XLA FFI headers')
  path = os.path.join(os.path.dirname(spec.origin), 'include')
  if not os.path.exists(os.path.join(path, 'xla', 'ffi', 'api', 'ffi.h')):
    raise BuildError(f'no xla/ffi/api/ffi.h under {path}')
  return path


def find_compiler() -> str:
  """Path of the C++ compiler: $CXX, else g++ / c++ / clang++ on PATH."""
  names = [os.environ['CXX']] if os.environ.get('CXX') else []
  for name in [*names, 'g++', 'c++', 'clang++']:
    path = shutil.which(name.split()[0])
    if path:
      return path
  raise BuildError('no C++ compiler found ($CXX, g++, c++, clang++)')


def compile_command(out_path: str) -> list[str]:
  """The compiler command that builds the library at `out_path`."""
  if sys.platform != 'linux':
    raise BuildError(
      f'the int4 kernel builds on Linux only, not {sys.platform}'
    )
  return [
    find_compiler(),
    '-O3',
    '-shared',
    '-fPIC',
    '-std=c++17',
    '-fvisibility=hidden',
    '-fno-math-errno',
    '-Wall',
    '-Wno-unused-function',
    '-Wno-attributes',
    f'-I{include_dir()}',
    SOURCE,
    '-o',
    out_path,
    '-lpthread',
  ]
