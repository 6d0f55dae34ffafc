"""lqer.core.gptq: the jitted, batched GPTQ against Qwix's eager one and NumPy.

Against `qwix.contrib.gptq_core.quantize_weight` on the same H and settings
the integers agree (all of them in the cases below; elsewhere, rarely, by
one step: 1 value in 4096 at (64, 384), int8 minmax, tile 32) and the later
groups' scales by 1-2 ulps (rtol 2e-7). Why: under jit XLA (CPU) contracts
the error feedback w - e u (and w - deq(q)) into a fused multiply-add,
rounded once, where Qwix's eager ops round the product and the difference
apart; the updated weights drift by ulps, so a group calibrated on them gets
a scale an ulp off and a value on a rounding boundary may round the other
way. The first block's groups (calibrated on W itself) agree bit for bit.

Qwix's eager GPTQ compiles its slices once per column of a block, so it is
compared here with blocksize 32 (several blocks and groups on small shapes,
fast); the default 128 against Qwix is covered by
tests/test_calibration.py::test_gptq_base_equals_qwix_gptq_and_qera_beats_it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qwix._src.core import qarray
from qwix.contrib import gptq_core

from lqer.core import gptq
from lqer.core import layout
from lqer.quant import bases

BLOCK = 32
DEAD = 5  # an input channel that never fires: diag(H) = 0


def _problem(rows, cols, seed=0, corr=0.5):
  """w (rows, cols) and H = E[x^T x] of correlated x with a dead channel."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((rows, cols)).astype(np.float32)
  mix = np.eye(cols) + corr * rng.standard_normal((cols, cols)) / np.sqrt(cols)
  x = rng.standard_normal((4 * cols, cols)) @ mix
  x[:, DEAD] = 0
  return jnp.asarray(w), jnp.asarray(x.T @ x / len(x), jnp.float32)


def _how(qtype, tile, method):
  return qarray.HowToQuantize(
    qtype=qtype,
    channelwise_axes=[0],
    tiled_axes={1: tile} if tile else {},
    calibration_method=method,
  )


class _ZeroPoint:
  """Works around Qwix's `zero_point and zero_point.squeeze(1)` (the truth
  value of an array raises), so its GPTQ runs with 'minmax'."""

  def __init__(self, array):
    self.array = array

  def squeeze(self, axis):
    return self.array.squeeze(axis)


def _qwix_gptq(monkeypatch, w, h, how):
  find = gptq_core.find_params

  def find_params(w, how):
    scale, zero_point = find(w, how)
    return scale, None if zero_point is None else _ZeroPoint(zero_point)

  monkeypatch.setattr(gptq_core, 'find_params', find_params)
  return gptq_core.quantize_weight(w, h, how, blocksize=BLOCK)[0]


def _assert_close_to(ours, theirs):
  steps = np.abs(
    np.asarray(ours.qvalue, np.int32) - np.asarray(theirs.qvalue, np.int32)
  )
  assert steps.max() <= 1 and np.mean(steps != 0) < 1e-3
  np.testing.assert_allclose(ours.scale, theirs.scale, rtol=1e-6)
  assert ours.qvalue.dtype == theirs.qvalue.dtype
  assert ours.qtype == theirs.qtype
  assert ours.scale.shape == theirs.scale.shape
  assert (ours.zero_point is None) == (theirs.zero_point is None)
  if ours.zero_point is not None:
    zp = np.abs(
      np.asarray(ours.zero_point, np.int32)
      - np.asarray(theirs.zero_point, np.int32)
    )
    assert zp.max() <= 1 and np.mean(zp != 0) < 1e-2


@pytest.mark.parametrize(
  'qtype,tile,method',
  [
    (jnp.int4, None, 'absmax'),  # per channel: one scale, from W itself
    (jnp.int4, 16, 'absmax'),  # two groups per block
    (jnp.int4, 88, 'minmax'),  # a group spans blocks, straddles a boundary
    (jnp.int8, 44, 'minmax'),  # groups straddle block boundaries
    (jnp.int8, 8, 'absmax'),  # four groups per block
  ],
)
def test_matches_qwix_gptq(monkeypatch, qtype, tile, method):
  """(32, 176): 5.5 blocks of 32, the last one partial, a dead column."""
  w, h = _problem(32, 176)
  how = _how(qtype, tile, method)
  theirs = _qwix_gptq(monkeypatch, w, h, how)
  ours = gptq.quantize_weight(w, h, how, blocksize=BLOCK)
  _assert_close_to(ours, theirs)
  assert not np.asarray(qarray.dequantize(ours))[:, DEAD].any()


def _numpy_gptq(w, h, bits, percdamp=0.01):
  """The paper's column-by-column GPTQ (no lazy blocks) in float64 with a
  symmetric per-channel absmax scale (Qwix's: absmax / (qmax + 1/2)):
  returns (q integers, scale)."""
  w = w.astype(np.float64).copy()
  h = h.astype(np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += percdamp * np.mean(np.diag(h) * ~dead) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  qmax = 2 ** (bits - 1) - 1
  scale = np.abs(w).max(1) / (qmax + 0.5)
  q = np.zeros_like(w)
  for j in range(w.shape[1]):
    q[:, j] = np.clip(np.round(w[:, j] / scale), -qmax - 1, qmax)
    e = (w[:, j] - q[:, j] * scale) / u[j, j]
    w[:, j:] -= np.outer(e, u[j, j:])
  return q, scale


@pytest.mark.parametrize('bits', [3, 5])
def test_sub_byte_qtypes_match_numpy(bits):
  """'int3' / 'int5' (`lqer eval --bits 3 / 5 --base gptq`) are stored as
  Qwix's RTN stores them (in int4 / int8, the logical qtype recorded;
  Qwix's own GPTQ casts to the name and fails), and equal the float64
  reference."""
  w, h = _problem(32, 176, seed=2, corr=2.0)
  how = _how(f'int{bits}', None, 'absmax')
  ours = gptq.quantize_weight(w, h, how, blocksize=BLOCK)
  rtn = qarray.quantize(w, how)
  assert ours.qvalue.dtype == rtn.qvalue.dtype
  assert ours.qtype == rtn.qtype == f'int{bits}'
  q_ref, scale_ref = _numpy_gptq(np.asarray(w), np.asarray(h), bits)
  np.testing.assert_allclose(ours.scale[:, 0], scale_ref, rtol=1e-6)
  assert np.mean(np.asarray(ours.qvalue, np.int32) != q_ref) < 1e-3
  deq = np.asarray(qarray.dequantize(ours))
  np.testing.assert_allclose(
    deq, q_ref * scale_ref[:, None], rtol=1e-5, atol=1e-7
  )


def _objective(w, deq, h):
  d = np.asarray(w, np.float64) - np.asarray(deq, np.float64)
  return np.trace(d @ np.asarray(h, np.float64) @ d.T)


def test_numpy_reference_and_beats_rtn_on_objective():
  """Lazy blocks change nothing but float rounding: the integers of an
  unblocked float64 GPTQ (all equal when written); GPTQ's
  tr((W - Q) H (W - Q)^T) is below RTN's (0.47x when written)."""
  w, h = _problem(32, 176, seed=1, corr=2.0)
  how = _how(jnp.int4, None, 'absmax')
  ours = gptq.quantize_weight(w, h, how, blocksize=BLOCK)
  q_ref, scale_ref = _numpy_gptq(np.asarray(w), np.asarray(h), 4)
  np.testing.assert_allclose(ours.scale[:, 0], scale_ref, rtol=1e-6)
  assert np.mean(np.asarray(ours.qvalue, np.int32) != q_ref) < 1e-3
  rtn = qarray.dequantize(qarray.quantize(w, how))
  err_gptq = _objective(w, qarray.dequantize(ours), h)
  assert err_gptq == pytest.approx(
    _objective(w, q_ref * scale_ref[:, None], h), rel=1e-3
  )
  assert err_gptq < 0.6 * _objective(w, rtn, h)


def test_stacked_equals_single():
  """One vmapped call on (n, out, in) = n single calls, bit for bit; a
  bfloat16 weight gets a bfloat16 scale (math in float32)."""
  ws, hs = zip(*[_problem(32, 96, seed=s) for s in range(3)])
  how = _how(jnp.int4, 32, 'minmax')
  stacked = gptq.quantize_stacked(
    jnp.stack(ws), jnp.stack(hs), how, blocksize=BLOCK
  )
  for i, (w, h) in enumerate(zip(ws, hs)):
    one = gptq.quantize_weight(w, h, how, blocksize=BLOCK)
    jax.tree.map(
      np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], stacked), one
    )
  bf16 = gptq.quantize_weight(
    ws[0].astype(jnp.bfloat16), hs[0], how, blocksize=BLOCK
  )
  assert bf16.scale.dtype == jnp.bfloat16
  assert bf16.qvalue.dtype == jnp.int4


def test_bases_gptq_stacked_equals_gptq():
  """bases.gptq_stacked on Flax kernels (in, out) = stacking bases.gptq."""
  problems = [_problem(48, 64, seed=s) for s in range(2)]
  ws = [w.T for w, _ in problems]
  stats = [{'sum_of_xtx': 3 * h, 'count': jnp.float32(3)} for _, h in problems]
  how = qarray.HowToQuantize(
    qtype=jnp.int4, channelwise_axes=[1], tiled_axes={0: 32}
  )
  kernel = layout.KernelLayout((64, 48), (0,))
  stacked, none = bases.gptq_stacked(ws, how, kernel, stats)
  assert none is None and stacked.qvalue.shape == (2, 64, 48)
  for i, (w, s) in enumerate(zip(ws, stats)):
    one, _ = bases.gptq(w, how, kernel, s)
    jax.tree.map(
      np.testing.assert_array_equal,
      jax.tree.map(lambda x, i=i: x[i], stacked),
      one,
    )
