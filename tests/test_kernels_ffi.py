"""lqer.kernels.ffi: the int4 CPU matmul (XLA FFI) against independent
NumPy references, every instruction-set path, and its build's failure mode.

The kernel builds at `pip install -e .` wherever a C++ compiler is present
(CI builds it); where it is absent these tests skip and
tests/test_kernel_integration.py checks the XLA fallback.
"""

import functools
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lqer.kernels import build
from lqer.kernels import ffi

pytestmark = pytest.mark.skipif(
  not ffi.available(), reason=str(ffi.unavailable_reason())
)

SHAPES = [(64, 32), (576, 1536), (1536, 576), (1031, 578)]
TOKENS = [1, 17, 63, 128]
ISAS = ['scalar', 'avx2', 'avx512', 'avx512vnni']
BF16 = ml_dtypes.bfloat16


def groups_for(n_in):
  """Scale rows: per-channel (1) and groups of 32 / 64 / 128 rows."""
  return [1] + [n_in // g for g in (32, 64, 128) if n_in % g == 0]


@functools.lru_cache(maxsize=None)
def weight(n_in, n_out, groups, seed=0):
  rng = np.random.default_rng([n_in, n_out, groups, seed])
  q = rng.integers(-8, 8, (n_in, n_out), dtype=np.int8)
  h = n_out // 2
  packed = ((q[:, :h] & 15) | ((q[:, h:] & 15) << 4)).astype(np.uint8)
  scale = rng.uniform(0.5, 1.5, (groups, n_out)).astype(np.float32)
  return q, packed, scale


def unpack_reference(packed):
  """q from packed bytes, by the format's definition (arithmetic shifts)."""
  b = packed.view(np.int8)
  lo = (b << 4).astype(np.int8) >> 4
  hi = b >> 4
  return np.concatenate([lo, hi], axis=1).astype(np.int8)


def dequant64(packed, scale):
  q = unpack_reference(packed).astype(np.float64)
  return q * np.repeat(
    scale.astype(np.float64), q.shape[0] // scale.shape[0], axis=0
  )


def inputs(t, n_in, n_out, rank, dtype, seed=1, lam=False):
  rng = np.random.default_rng([t, n_in, n_out, rank, seed])
  x = (
    (rng.standard_normal((t, n_in)) * rng.uniform(0.1, 10, (t, 1)))
    .astype(np.float32)
    .astype(dtype)
  )
  a = rng.standard_normal((n_in, rank)).astype(np.float32) * 0.1
  b = rng.standard_normal((rank, n_out)).astype(np.float32) * 0.1
  lam_v = rng.uniform(0.25, 4, n_in).astype(np.float32) if lam else None
  return x, a, b, lam_v


def rel_err(y, ref):
  y = np.asarray(y, np.float64)
  return np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300)


@functools.lru_cache(maxsize=None)
def jitted(**static):
  return jax.jit(functools.partial(ffi.int4_matmul, **static))


def call(x, packed, scale, a=None, b=None, lam=None, **static):
  return np.asarray(jitted(**static)(x, packed, scale, a, b, lam=lam))


# --- NumPy reference of Qwix's dynamic int8 quantization --------------------
# Qwix: scale = absmax / 127.5 (qmax = iinfo(int8).max + 0.5), 1 where below
# sqrt(tiny); q = round_half_even(x / scale) converted to int8 (saturating).
# Under jit on CPU, XLA computes the divisions as multiplications by
# reciprocals: absmax * f32(1/127.5), x * (1 / scale), and lqer's x / lam as
# x * (1 / lam); bfloat16 arrays round each bfloat16 op's result.


def qwix_int8_numpy(x, lam=None, tile=None):
  """(q int8, scale float32 per token [and tile]) of x (T, IN)."""
  bf = x.dtype == BF16
  xs = x.astype(np.float32)
  if lam is not None:
    lam32 = lam.astype(BF16).astype(np.float32) if bf else lam
    xs = xs * (np.float32(1) / lam32)
    if bf:
      xs = xs.astype(BF16).astype(np.float32)
  t, n = xs.shape
  tile = tile or n
  xt = xs.reshape(t, n // tile, tile)
  s = np.abs(xt).max(-1, keepdims=True) * np.float32(1 / 127.5)
  if bf:
    s = s.astype(BF16).astype(np.float32)
  s = np.where(s < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), s)
  v = xt * (np.float32(1) / s)
  if bf:
    v = v.astype(BF16).astype(np.float32)
  q = np.clip(np.rint(v), -128, 127).astype(np.int8)
  return q.reshape(t, n), s[..., 0].astype(np.float32)


def qwix_int8(x, lam=None, tile=None):
  """The same through Qwix itself (jit), as lqer quantizes activations."""
  from qwix._src.core import qarray

  def f(x, lam):
    if lam is not None:
      x = x / lam.astype(x.dtype)
    how = qarray.HowToQuantize(
      qtype=jnp.int8,
      channelwise_axes=(0,),
      tiled_axes={1: tile} if tile else {},
    )
    q = qarray.quantize(x, how)
    return q.qvalue, q.scale.astype(jnp.float32)

  q, s = jax.jit(f)(jnp.asarray(x), None if lam is None else jnp.asarray(lam))
  return np.asarray(q), np.asarray(s).reshape(q.shape[0], -1)


def a8_reference(x, packed, scale, a, b, lam, tile=None, lam_in_branch=False):
  q, s = qwix_int8_numpy(x, lam, tile)
  t, n = q.shape
  tile = tile or n
  xd = (
    q.astype(np.float64).reshape(t, n // tile, tile)
    * s.astype(np.float64)[..., None]
  ).reshape(t, n)
  y = xd @ dequant64(packed, scale)
  if a is not None and a.shape[1]:
    xb = x.astype(np.float64)
    if lam_in_branch and lam is not None:
      xb = xb / lam.astype(np.float64)
    y += (xb @ a.astype(np.float64)) @ b.astype(np.float64)
  return y


def f32_reference(x, packed, scale, a, b, lam=None, lam_in_branch=False):
  x64 = x.astype(np.float64)
  xm = x64 / lam.astype(np.float64) if lam is not None else x64
  y = xm @ dequant64(packed, scale)
  if a is not None and a.shape[1]:
    xb = xm if lam_in_branch else x64
    y += (xb @ a.astype(np.float64)) @ b.astype(np.float64)
  return y


# --- weight-only -------------------------------------------------------------


@pytest.mark.parametrize('n_in,n_out', SHAPES)
def test_unpack_reference_matches_lqer_format(n_in, n_out):
  q, packed, _ = weight(n_in, n_out, 1)
  np.testing.assert_array_equal(unpack_reference(packed), q)


F32_CASES = [
  (t, shape, g, r, dt)
  for t, shape in itertools.product(TOKENS, SHAPES)
  for g in groups_for(shape[0])
  for r, dt in [(0, np.float32), (32, BF16), (32, np.float32)]
]


@pytest.mark.parametrize('t,shape,groups,rank,dtype', F32_CASES)
def test_weight_only(t, shape, groups, rank, dtype):
  n_in, n_out = shape
  _, packed, scale = weight(n_in, n_out, groups)
  x, a, b, _ = inputs(t, n_in, n_out, rank, dtype)
  y = call(x, packed, scale, a if rank else None, b if rank else None)
  assert y.shape == (t, n_out) and y.dtype == np.float32
  ref = f32_reference(x.astype(np.float32), packed, scale, a, b)
  assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize('lam_in_branch', [False, True])
@pytest.mark.parametrize('dtype', [np.float32, BF16])
def test_weight_only_lam(dtype, lam_in_branch):
  n_in, n_out = 1031, 578
  _, packed, scale = weight(n_in, n_out, 1)
  x, a, b, lam = inputs(17, n_in, n_out, 32, dtype, lam=True)
  y = call(x, packed, scale, a, b, lam=lam, lam_in_branch=lam_in_branch)
  # bf16 x: x / lam is rounded to bf16 (as lqer computes it in x's dtype).
  xr = x.astype(np.float32)
  ref = f32_reference(xr, packed, scale, a, b, lam, lam_in_branch)
  assert rel_err(y, ref) < (1e-5 if dtype == np.float32 else 1e-2)
  if dtype == BF16:
    xs = (xr * (1 / lam.astype(BF16).astype(np.float32))).astype(BF16)
    ref = xs.astype(np.float64) @ dequant64(packed, scale)
    xb = xs if lam_in_branch else xr
    ref += (xb.astype(np.float64) @ a) @ b
    assert rel_err(y, ref) < 1e-5


# --- W4A8 ------

A8_CASES = [
  (t, shape, g, r, dt, lam)
  for t, shape in itertools.product(TOKENS, SHAPES)
  for g in sorted({1, groups_for(shape[0])[-1]})
  for r, dt, lam in [
    (0, np.float32, False),
    (32, np.float32, True),
    (32, BF16, False),
    (0, BF16, True),
  ]
]


@pytest.mark.parametrize('t,shape,groups,rank,dtype,use_lam', A8_CASES)
def test_w4a8(t, shape, groups, rank, dtype, use_lam):
  n_in, n_out = shape
  _, packed, scale = weight(n_in, n_out, groups)
  x, a, b, lam = inputs(t, n_in, n_out, rank, dtype, lam=use_lam)
  y = call(
    x,
    packed,
    scale,
    a if rank else None,
    b if rank else None,
    lam=lam,
    act_bits=8,
  )
  ref = a8_reference(x, packed, scale, a if rank else None, b, lam)
  assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize('dtype', [np.float32, BF16])
@pytest.mark.parametrize('use_lam', [False, True])
@pytest.mark.parametrize('tile', [None, 32, 128])
def test_numpy_int8_matches_qwix(dtype, use_lam, tile):
  """The NumPy reference is Qwix's own quantization, bit for bit."""
  x, _, _, lam = inputs(63, 1536, 2, 0, dtype, lam=use_lam)
  x[3] = 0  # all-zero token: scale 1
  x[5, 7] = -x[5].max() * 3  # negative absmax: q = -128 after rounding
  q, s = qwix_int8_numpy(x, lam if use_lam else None, tile)
  q2, s2 = qwix_int8(x, lam if use_lam else None, tile)
  np.testing.assert_array_equal(s, s2)
  np.testing.assert_array_equal(q, q2)


@pytest.mark.parametrize('tile', [32, 128])
def test_w4a8_act_tile(tile):
  n_in, n_out = 1536, 576
  _, packed, scale = weight(n_in, n_out, n_in // 64)
  x, a, b, lam = inputs(17, n_in, n_out, 32, np.float32, lam=True)
  y = call(x, packed, scale, a, b, lam=lam, act_bits=8, act_tile=tile)
  ref = a8_reference(x, packed, scale, a, b, lam, tile)
  assert rel_err(y, ref) < 1e-5


def test_w4a8_edge_rows():
  """Zero tokens (scale 1), odd group sizes (515 rows), lam in branch."""
  n_in, n_out = 1030, 578
  _, packed, scale = weight(n_in, n_out, 2)
  x, a, b, lam = inputs(5, n_in, n_out, 32, np.float32, lam=True)
  x[1] = 0
  x[2, 9] = -x[2].max() * 3
  y = call(x, packed, scale, a, b, lam=lam, act_bits=8, lam_in_branch=True)
  ref = a8_reference(x, packed, scale, a, b, lam, lam_in_branch=True)
  assert rel_err(y, ref) < 1e-5


# --- factors ------


@pytest.mark.parametrize('act_bits', [None, 8])
@pytest.mark.parametrize('kind', ['int8', 'int4', 'bf16', 'f32_scaled'])
def test_factor_dtypes(kind, act_bits):
  n_in, n_out, r = 576, 1536, 32
  _, packed, scale = weight(n_in, n_out, n_in // 64)
  x, _, _, _ = inputs(17, n_in, n_out, r, np.float32)
  rng = np.random.default_rng(5)
  lo, hi = (-8, 8) if kind == 'int4' else (-127, 128)
  aq = rng.integers(lo, hi, (n_in, r)).astype(np.int8)
  bq = rng.integers(lo, hi, (r, n_out)).astype(np.int8)
  sa = rng.uniform(1e-3, 2e-3, r).astype(np.float32)
  sb = rng.uniform(1e-3, 2e-3, r).astype(np.float32)
  a_f = aq.astype(np.float64) * sa
  b_f = bq.astype(np.float64) * sb[:, None]
  kw = dict(a_scale=sa, b_scale=sb)
  if kind == 'int8':
    a, b = aq, bq
  elif kind == 'int4':
    a, b = jnp.asarray(aq, jnp.int4), jnp.asarray(bq, jnp.int4)
  elif kind == 'bf16':
    a = (a_f.astype(np.float32)).astype(BF16)
    b = (b_f.astype(np.float32)).astype(BF16)
    a_f, b_f = a.astype(np.float64), b.astype(np.float64)
    kw = {}
  else:
    a, b = aq.astype(np.float32), bq.astype(np.float32)
  y = np.asarray(
    jax.jit(functools.partial(ffi.int4_matmul, act_bits=act_bits))(
      x, packed, scale, a, b, **kw
    )
  )
  if act_bits:
    ref = a8_reference(x, packed, scale, None, None, None)
  else:
    ref = f32_reference(x, packed, scale, None, None)
  ref = ref + (x.astype(np.float64) @ a_f) @ b_f
  assert rel_err(y, ref) < 1e-5


# --- jit, vmap, shapes --------------------------------------------------------


@pytest.mark.parametrize('act_bits', [None, 8])
def test_vmap_and_leading_dims(act_bits):
  n_in, n_out = 576, 1536
  _, packed, scale = weight(n_in, n_out, n_in // 32)
  x, a, b, _ = inputs(24, n_in, n_out, 32, np.float32)
  flat = call(x, packed, scale, a, b, act_bits=act_bits)
  f = functools.partial(ffi.int4_matmul, act_bits=act_bits)
  # leading dims
  y = jax.jit(f)(x.reshape(2, 3, 4, n_in), packed, scale, a, b)
  np.testing.assert_array_equal(np.asarray(y).reshape(24, n_out), flat)
  # vmap over x (folded into tokens: one kernel call)
  y = jax.jit(jax.vmap(f, in_axes=(0, None, None, None, None)))(
    x.reshape(4, 6, n_in), packed, scale, a, b
  )
  np.testing.assert_array_equal(np.asarray(y).reshape(24, n_out), flat)
  y = jax.jit(
    jax.vmap(
      jax.vmap(f, in_axes=(0, None, None, None, None)),
      in_axes=(1, None, None, None, None),
    )
  )(x.reshape(4, 6, n_in).transpose(1, 0, 2), packed, scale, a, b)
  np.testing.assert_array_equal(np.asarray(y).reshape(24, n_out), flat)
  # vmap over stacked weights (one call per entry)
  _, packed2, scale2 = weight(n_in, n_out, n_in // 32, seed=1)
  ps, ss = np.stack([packed, packed2]), np.stack([scale, scale2])
  y = jax.jit(jax.vmap(f, in_axes=(None, 0, 0, None, None)))(x, ps, ss, a, b)
  np.testing.assert_array_equal(np.asarray(y[0]), flat)
  np.testing.assert_array_equal(
    np.asarray(y[1]), call(x, packed2, scale2, a, b, act_bits=act_bits)
  )


def test_scan_and_empty():
  n_in, n_out = 64, 32
  _, packed, scale = weight(n_in, n_out, 2)
  x, _, _, _ = inputs(3, n_in, n_out, 0, np.float32)
  y = np.asarray(jax.jit(lambda x: ffi.int4_matmul(x[:0], packed, scale))(x))
  assert y.shape == (0, n_out)

  def body(c, _):
    return c, ffi.int4_matmul(c, packed, scale)

  _, ys = jax.jit(lambda x: jax.lax.scan(body, x, None, length=3))(x)
  np.testing.assert_array_equal(np.asarray(ys[2]), call(x, packed, scale))


def test_bad_arguments():
  _, packed, scale = weight(64, 32, 1)
  x = np.zeros((2, 64), np.float32)
  with pytest.raises(ValueError):
    ffi.int4_matmul(x[:, :63], packed, scale)
  with pytest.raises(ValueError):
    ffi.int4_matmul(x, packed, np.ones((3, 32), np.float32))
  with pytest.raises(ValueError):
    ffi.int4_matmul(
      x, packed, scale, np.zeros((64, 2), np.int8), np.zeros((2, 32), np.int8)
    )
  with pytest.raises(ValueError):
    ffi.int4_matmul(x, packed, scale, act_bits=4)


# --- instruction sets and threads ------


def _isas():
  hw = ISAS.index(ffi.hardware_isa())
  return ISAS[: hw + 1]


@pytest.mark.parametrize('act_bits', [None, 8])
def test_isa_paths_agree(monkeypatch, act_bits):
  """Every ISA path this CPU has (LQER_ISA, read at each call) gives the
  reference's numbers and the same numbers as the others."""
  cases = [
    (1, 1031, 578, 1),
    (17, 576, 1536, 18),
    (63, 1536, 576, 24),
    (128, 64, 32, 2),
    (5, 1030, 578, 2),
  ]
  for t, n_in, n_out, g in cases:
    _, packed, scale = weight(n_in, n_out, g)
    x, a, b, lam = inputs(t, n_in, n_out, 32, np.float32, lam=True)
    if act_bits:
      ref = a8_reference(x, packed, scale, a, b, lam)
    else:
      ref = f32_reference(x, packed, scale, a, b, lam)
    outs = {}
    for isa in _isas():
      monkeypatch.setenv('LQER_ISA', isa)
      assert ffi.isa() == isa
      outs[isa] = call(x, packed, scale, a, b, lam=lam, act_bits=act_bits)
      assert rel_err(outs[isa], ref) < 1e-5, (isa, t, n_in, n_out)
    base = outs['scalar'].astype(np.float64)
    for isa, y in outs.items():
      assert rel_err(y, base) < 2e-6, (isa, t, n_in, n_out)


@pytest.mark.parametrize(
  't, n_in, n_out, groups, lam',
  [
    (16, 576, 1536, 18, False),
    (17, 1031, 578, 1, True),
    (128, 1536, 576, 24, True),
    (70, 64, 34, 2, False),
  ],
)
def test_bf16_dot_path_agrees(monkeypatch, t, n_in, n_out, groups, lam):
  """bfloat16 x from 16 tokens on: the AVX-512 BF16 panel path (where the
  CPU has it) against the reference and against the float path
  (LQER_BF16_MIN_T above the tokens turns it off): odd rows, column tails,
  groups, x / lam, the branch."""
  _, packed, scale = weight(n_in, n_out, groups)
  x, a, b, lam_v = inputs(t, n_in, n_out, 32, BF16, lam=lam)
  ref = f32_reference(x.astype(np.float32), packed, scale, a, b, lam_v)
  if lam:  # x * (1 / lam), lam and the product rounded to bfloat16
    inv = np.float32(1) / lam_v.astype(BF16).astype(np.float32)
    xs = (x.astype(np.float32) * inv).astype(BF16)
    ref = f32_reference(xs.astype(np.float32), packed, scale, None, None)
    ref += (x.astype(np.float64) @ a.astype(np.float64)) @ b.astype(np.float64)
  y = call(x, packed, scale, a, b, lam=lam_v)
  monkeypatch.setenv('LQER_BF16_MIN_T', str(t + 1))
  y_f32 = call(x, packed, scale, a, b, lam=lam_v)
  assert rel_err(y, ref) < 1e-5
  assert rel_err(y, y_f32.astype(np.float64)) < 2e-6


@pytest.mark.parametrize(
  't, n_in, n_out, rank, scaled',
  [
    (128, 640, 2048, 32, False),
    (16, 576, 1536, 64, True),
    (17, 1031, 578, 33, False),
    (70, 64, 34, 5, True),
  ],
)
def test_bf16_branch(monkeypatch, t, n_in, n_out, rank, scaled):
  """bfloat16 x with bfloat16 factors on the bf16 panel path: the branch
  multiplies in bf16 too, x A from the exact products and xa rounded to
  bfloat16 (nearest even) before B; odd IN and rank, rank chunks of 32,
  rank-component scales. 1 and 2 threads give the same bits."""
  if not ffi.bf16_dots():
    pytest.skip('no AVX-512 BF16 on this CPU: the branch stays float32')
  _, packed, scale = weight(n_in, n_out, 1)
  x, a, b, _ = inputs(t, n_in, n_out, rank, BF16)
  a, b = a.astype(BF16), b.astype(BF16)
  rng = np.random.default_rng(rank)
  sa, sb = (
    (rng.uniform(0.5, 2, rank).astype(np.float32) for _ in range(2))
    if scaled
    else (None, None)
  )
  run = lambda: np.asarray(
    jax.jit(ffi.int4_matmul)(x, packed, scale, a, b, a_scale=sa, b_scale=sb)
  )
  y = run()
  x64 = x.astype(np.float64)
  xa = x64 @ a.astype(np.float64)
  if scaled:
    xa = xa * sa * sb
  main = x64 @ dequant64(packed, scale)
  xa_bf16 = xa.astype(np.float32).astype(BF16).astype(np.float64)
  assert rel_err(y, main + xa_bf16 @ b.astype(np.float64)) < 1e-5
  # Against the exact branch: bf16's rounding of xa, and nothing more.
  branch = y - main
  exact = xa @ b.astype(np.float64)
  assert 1e-4 < rel_err(branch, exact) < 4e-3
  monkeypatch.setenv('LQER_NUM_THREADS', '1')
  np.testing.assert_array_equal(run(), y)


@pytest.mark.parametrize('split_xa', ['65536', '1'])
@pytest.mark.parametrize('act_bits', [None, 8])
def test_thread_counts_agree(monkeypatch, act_bits, split_xa):
  """Columns are split between threads without changing any output's
  arithmetic: 1, 2 and 3 threads give identical bits, also where x @ a is
  split over a's rows (LQER_SPLIT_XA=1: from any size on)."""
  monkeypatch.setenv('LQER_SPLIT_XA', split_xa)
  n_in, n_out = 1536, 576
  _, packed, scale = weight(n_in, n_out, 12)
  outs = []
  for t in (1, 128):
    x, a, b, _ = inputs(t, n_in, n_out, 32, np.float32)
    for n in ('1', '2', '3'):
      monkeypatch.setenv('LQER_NUM_THREADS', n)
      outs.append((t, n, call(x, packed, scale, a, b, act_bits=act_bits)))
  for t, n, y in outs:
    ref = next(y0 for t0, _, y0 in outs if t0 == t)
    np.testing.assert_array_equal(y, ref)


def test_unavailable_without_library():
  code = (
    'from lqer.kernels import ffi;'
    ' print(ffi.available()); print(ffi.unavailable_reason())'
  )
  env = dict(
    os.environ, LQER_INT4_SO='/nonexistent/lib.so', JAX_PLATFORMS='cpu'
  )
  out = subprocess.run(
    [sys.executable, '-c', code],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  lines = out.stdout.strip().splitlines()
  assert lines[0] == 'False', out.stderr
  assert 'not found' in lines[1]


KNOBS = [dict(LQER_F32MODE=str(m)) for m in range(5)] + [
  dict(LQER_F32_TW='16'),
  dict(LQER_F32_TT='3'),
  dict(LQER_A8_TT='6'),
  dict(LQER_RB='4', LQER_RB1='4'),
  dict(LQER_RB='1024', LQER_RB1='4096'),
  dict(LQER_PF='256', LQER_PF1='0'),
  dict(LQER_PANEL_MIN_T='99999'),
  dict(LQER_TASKS_PER_THREAD='1'),
  dict(LQER_SPIN_US='0'),
  dict(LQER_PF_WRAP='0'),
  dict(LQER_SPLIT_XA='1'),
]


@pytest.mark.parametrize(
  'knob', KNOBS, ids=lambda k: ','.join(f'{a}={b}' for a, b in k.items())
)
def test_tuning_knobs(monkeypatch, knob):
  """The env tuning knobs (read at each call) change speed, not results."""
  for name, value in knob.items():
    monkeypatch.setenv(name, value)
  for t, n_in, n_out, g in [
    (1, 1031, 578, 1),
    (1, 576, 1536, 18),
    (20, 1536, 576, 12),
    (13, 1030, 578, 2),
  ]:
    _, packed, scale = weight(n_in, n_out, g)
    x, a, b, lam = inputs(t, n_in, n_out, 32, np.float32, lam=True)
    y = call(x, packed, scale, a, b, lam=lam)
    assert rel_err(y, f32_reference(x, packed, scale, a, b, lam)) < 1e-5
    y = call(x, packed, scale, a, b, lam=lam, act_bits=8)
    assert rel_err(y, a8_reference(x, packed, scale, a, b, lam)) < 1e-5


def test_build_without_compiler_raises(monkeypatch):
  monkeypatch.delenv('CXX', raising=False)
  monkeypatch.setenv('PATH', '/nonexistent')
  with pytest.raises(build.BuildError, match='no C\\+\\+ compiler found'):
    build.compile_command('/tmp/lqer_no_compiler.so')


@pytest.mark.parametrize('act_bits', [None, 8])
@pytest.mark.parametrize('a_dtype', [np.float32, BF16, 'int8'])
def test_row_scale_scales_the_branch_input(monkeypatch, act_bits, a_dtype):
  """row_scale s (the input scale kept out of A): the branch is
  ((x s) A) B with A read as stored, on every ISA, for 1 token (x A split
  over A's rows) and 17; the main product does not see s."""
  n_in, n_out, rank = 1030, 578, 32
  _, packed, scale = weight(n_in, n_out, 2)
  rng = np.random.default_rng(7)
  s = rng.uniform(0.25, 4, n_in).astype(np.float32)
  for t in (1, 17):
    x, a, b, lam = inputs(t, n_in, n_out, rank, np.float32, lam=True)
    a_scale = None
    if a_dtype == 'int8':
      a_scale = (np.abs(a).max(0) / 127).astype(np.float32)
      a = np.round(a / a_scale).astype(np.int8)
      a_f = a.astype(np.float64) * a_scale
    else:
      a = a.astype(a_dtype)
      a_f = a.astype(np.float64)
    ref_fn = a8_reference if act_bits else f32_reference
    ref = ref_fn(x, packed, scale, s[:, None] * a_f, b, lam)
    monkeypatch.setenv('LQER_SPLIT_XA', '1')
    for isa in _isas():
      monkeypatch.setenv('LQER_ISA', isa)
      y = ffi.int4_matmul(
        x,
        packed,
        scale,
        a,
        b,
        a_scale=a_scale,
        lam=lam,
        row_scale=s,
        act_bits=act_bits,
      )
      assert rel_err(y, ref) < 1e-5, (isa, t)
  with pytest.raises(ValueError, match='row_scale has 3 elements'):
    ffi.int4_matmul(x, packed, scale, a, b, a_scale=a_scale, row_scale=s[:3])
