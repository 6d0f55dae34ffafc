"""JAX binding of the int4 CPU matmul (`int4_kernel.cc`, an XLA FFI call).

    from lqer.kernels import ffi
    y = ffi.int4_matmul(x, packed, scale)                 # weight-only
    y = ffi.int4_matmul(x, packed, scale, a, b)           # + (x @ a) @ b
    y = ffi.int4_matmul(x, packed, scale, act_bits=8, lam=lam)   # W4A8

Works inside `jax.jit` and under `jax.vmap` (a batch of x folds into the
token axis: one kernel call; batched weights: one call per entry). CPU only.
The library is looked up at $LQER_INT4_SO, then beside this file, where
`pip install` builds it. When it is missing or fails to load, `available()`
is False and `unavailable_reason()` says why; `int4_matmul` then raises.
"""

import ctypes
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

_DIR = os.path.dirname(os.path.abspath(__file__))
TARGET_F32 = 'lqer_int4_matmul_f32'
TARGET_A8 = 'lqer_int4_matmul_a8'

_lib = None
_reason = 'not loaded yet'
_tried = False


def _candidates():
  """$LQER_INT4_SO, else the library `pip install` built beside this file."""
  env = os.environ.get('LQER_INT4_SO')
  if env:
    return [env]
  return sorted(glob.glob(os.path.join(_DIR, '_int4_kernel*.so'))) or [
    os.path.join(_DIR, '_int4_kernel.so')
  ]


def load(path: str | None = None) -> bool:
  """Loads the library (`path`, else the default places) and registers its
  FFI targets with JAX; returns `available()`. Safe to call again."""
  global _lib, _reason, _tried
  if _lib is not None:
    return True
  _tried = True
  paths = [path] if path else _candidates()
  found = [p for p in paths if os.path.exists(p)]
  if not found:
    _reason = (
      'lqer int4 kernel library not found (looked for '
      + ', '.join(paths)
      + '); `pip install -e .` builds it where a C++ compiler is present'
    )
    return False
  try:
    lib = ctypes.CDLL(found[0])
    for name in ('lqer_isa', 'lqer_hardware_isa'):
      getattr(lib, name).restype = ctypes.c_char_p
    lib.lqer_num_threads.restype = ctypes.c_int
    lib.lqer_bf16_dots.restype = ctypes.c_int
    jax.ffi.register_ffi_target(
      TARGET_F32, jax.ffi.pycapsule(lib.LqerInt4MatmulF32), platform='cpu'
    )
    jax.ffi.register_ffi_target(
      TARGET_A8, jax.ffi.pycapsule(lib.LqerInt4MatmulA8), platform='cpu'
    )
  except (OSError, AttributeError, RuntimeError, ValueError) as e:
    _reason = f'loading {found[0]} failed: {e}'
    return False
  _lib = lib
  _reason = None
  return True


def available() -> bool:
  """Whether the kernel library is loaded (loading it on first use)."""
  if _lib is None and not _tried:
    load()
  return _lib is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  available()
  return _reason


def isa() -> str:
  """The instruction set a call uses now: 'avx512vnni', 'avx512', 'avx2' or
  'scalar' (cpuid, capped by the env var LQER_ISA, read at every call)."""
  _require()
  return _lib.lqer_isa().decode()


def hardware_isa() -> str:
  _require()
  return _lib.lqer_hardware_isa().decode()


def bf16_dots() -> bool:
  """Whether bfloat16 x from 16 tokens on multiplies with AVX-512 BF16 dot
  products now (the CPU has them and $LQER_ISA leaves avx512vnni on); the
  branch then also multiplies in bfloat16 where its factors are bfloat16."""
  _require()
  return bool(_lib.lqer_bf16_dots())


def num_threads() -> int:
  """Threads a call uses (env LQER_NUM_THREADS, else all cores)."""
  _require()
  return int(_lib.lqer_num_threads())


def _require():
  if not available():
    raise RuntimeError(f'lqer int4 kernel unavailable: {_reason}')


@functools.lru_cache(maxsize=None)
def _core(a8: bool, lam_in_branch: bool, act_tile: int):
  """The FFI call on flat arrays, with a vmap rule: x batched alone folds
  the batch into tokens; batched weights run one call per entry."""
  target = TARGET_A8 if a8 else TARGET_F32

  def call(x, packed, scale, a, b, a_scale, b_scale, lam, row_scale):
    out = jax.ShapeDtypeStruct((x.shape[0], 2 * packed.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method='sequential')(
      x,
      packed,
      scale,
      a,
      b,
      a_scale,
      b_scale,
      lam,
      row_scale,
      lam_in_branch=np.int32(lam_in_branch),
      act_tile=np.int32(act_tile),
    )

  f = jax.custom_batching.custom_vmap(call)

  @f.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size
    if in_batched[0] and not any(in_batched[1:]):
      x = args[0]
      nb, t, n_in = x.shape
      y = f(x.reshape(nb * t, n_in), *args[1:])
      return y.reshape(nb, t, y.shape[-1]), True

    def one(batched):
      it = iter(batched)
      return f(*[next(it) if bt else arg for arg, bt in zip(args, in_batched)])

    return jax.lax.map(one, [a for a, bt in zip(args, in_batched) if bt]), True

  return f


def _factor(v, name):
  v = jnp.asarray(v)
  if v.dtype == jnp.int4:
    return v.astype(jnp.int8)
  if v.dtype in (jnp.int8, jnp.float32, jnp.bfloat16):
    return v
  if jnp.issubdtype(v.dtype, jnp.floating):
    return v.astype(jnp.float32)
  raise TypeError(
    f'{name}: unsupported dtype {v.dtype} (float32, bfloat16, int8 or int4)'
  )


def int4_matmul(
  x,
  packed,
  scale,
  a=None,
  b=None,
  *,
  act_bits=None,
  lam=None,
  a_scale=None,
  b_scale=None,
  lam_in_branch=False,
  act_tile=None,
  row_scale=None,
):
  """y = (x / lam) @ deq(packed, scale) [+ ((x * row_scale) @ a) @ b].

  Args:
    x: (..., IN) float32 or bfloat16 (other floats are cast to float32).
      bfloat16 x with 16 or more tokens multiplies with AVX-512 BF16 dot
      products on a bfloat16 copy of q (exact) where the CPU has them (and
      the ISA in use is 'avx512vnni'), float32 accumulation either way.
    packed: uint8 (IN, OUT // 2), lqer's `PackedInt4.packed` (low nibble
      q[i, j], high nibble q[i, j + OUT // 2]).
    scale: (G, OUT) (or (OUT,)); IN / G consecutive rows share a row. Cast
      to float32.
    a, b: optional low-rank factors (IN, R), (R, OUT): float32, bfloat16,
      int8 or int4 (int4 is widened to int8 here). Integer factors need
      a_scale / b_scale: R per-rank-component scales (any shape of R
      elements), a_f = a * a_scale[None, :], b_f = b * b_scale[:, None]
      (optional, same meaning, for float factors).
    act_bits: None (weight-only: float activations, float32 accumulation)
      or 8 (W4A8: x / lam quantized to int8 per token, as Qwix's dynamic
      int8 quantization does under jit on CPU, integer dot products).
    lam: optional (IN,) per-input-channel divisor (SmoothQuant / SVDQuant /
      AWQ input scale): the main product reads x / lam.
    lam_in_branch: False (default; lqer's convention, whose A already
      carries 1 / lam): the branch reads x; True: it reads x / lam.
    act_tile: W4A8 only: one activation scale per `act_tile` consecutive
      rows of each token (Qwix's tile_size on the contracting axis) instead
      of one per token; must divide IN.
    row_scale: optional (IN,): the branch reads x * row_scale (an input
      scale kept apart from a, so a stays in its stored dtype).

  Returns:
    float32 (..., OUT).
  """
  _require()
  x = jnp.asarray(x)
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    x = x.astype(jnp.float32)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8 or packed.ndim != 2:
    raise TypeError(
      f'packed must be uint8 (IN, OUT/2), got {packed.dtype} {packed.shape}'
    )
  n_in, half = packed.shape
  n_out = 2 * half
  if x.shape[-1] != n_in:
    raise ValueError(f'x {x.shape} does not match packed {packed.shape}')
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim == 1:
    scale = scale.reshape(1, -1)
  if scale.ndim != 2 or scale.shape[1] != n_out or n_in % scale.shape[0]:
    raise ValueError(
      f'scale {scale.shape} must be (G, {n_out}) with G dividing {n_in}'
    )
  if (a is None) != (b is None):
    raise ValueError('give both low-rank factors a and b, or neither')
  if a is None:
    a = jnp.zeros((n_in, 0), jnp.float32)
    b = jnp.zeros((0, n_out), jnp.float32)
  a, b = _factor(a, 'a'), _factor(b, 'b')
  if a.shape[0] != n_in or b.shape != (a.shape[1], n_out):
    raise ValueError(
      f'a {a.shape}, b {b.shape} must be ({n_in}, R), (R, {n_out})'
    )
  rank = a.shape[1]

  def rank_scale(s, name, v):
    if s is None:
      if v.dtype == jnp.int8 and rank:
        raise ValueError(f'integer factor {name} needs {name}_scale')
      return jnp.zeros((0,), jnp.float32)
    s = jnp.asarray(s, jnp.float32).reshape(-1)
    if s.shape[0] != rank:
      raise ValueError(
        f'{name}_scale has {s.shape[0]} elements, rank is {rank}'
      )
    return s

  a_scale = rank_scale(a_scale, 'a', a)
  b_scale = rank_scale(b_scale, 'b', b)
  if lam is None:
    lam = jnp.zeros((0,), jnp.float32)
  else:
    lam = jnp.asarray(lam, jnp.float32).reshape(-1)
    if lam.shape[0] != n_in:
      raise ValueError(f'lam has {lam.shape[0]} elements, IN is {n_in}')
  if act_bits not in (None, 8):
    raise ValueError(f'act_bits must be None or 8, got {act_bits}')
  tile = 0
  if act_tile:
    if act_bits is None:
      raise ValueError('act_tile needs act_bits=8')
    if n_in % int(act_tile):
      raise ValueError(f'act_tile {act_tile} must divide IN {n_in}')
    tile = int(act_tile)
  if row_scale is None or not rank:
    row_scale = jnp.zeros((0,), jnp.float32)
  else:
    row_scale = jnp.asarray(row_scale, jnp.float32).reshape(-1)
    if row_scale.shape[0] != n_in:
      raise ValueError(
        f'row_scale has {row_scale.shape[0]} elements, IN is {n_in}'
      )
  lead = x.shape[:-1]
  y = _core(act_bits == 8, bool(lam_in_branch), tile)(
    x.reshape(-1, n_in), packed, scale, a, b, a_scale, b_scale, lam, row_scale
  )
  return y.reshape(*lead, n_out)


load()
