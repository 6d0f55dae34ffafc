"""GPTQ (Frantar et al. 2022), jitted and batched over same-shaped weights.

The algorithm and settings of Qwix's eager `gptq_core.quantize_weight`, as
one compiled program per (shape, settings) instead of one dispatch per op
and column. For W (out, in) and H = E[x^T x] (in, in), GPTQ minimises

    tr((W - Q) H (W - Q)^T)

one input column j at a time, feeding each column's error forward:

    U = chol((H + lambda I)^{-1})^T (upper),  lambda = percdamp mean(diag H),
    q_j = deq(Q(w_j)),  e_j = (w_j - q_j) / U_jj,  w_k -= e_j U_jk  (k > j).

Lazy blocks of `blocksize` (128) columns: inside a block the update reaches
only the block's columns; after it one matmul W[:, i2:] -= E_blk U[blk, i2:].
As in Qwix (and the paper's code): a group's (tile's) scale is calibrated on
W as it stands when the block holding the group's first column starts (the
lazy updates of earlier blocks in, those of its own block not); no act-order;
a dead column (H_jj = 0) gets w_j = 0 and H_jj = 1. Calibration, rounding and
dequantization are Qwix's own functions (`qarray`).
"""

import functools

import jax
import jax.numpy as jnp
import qwix

from lqer import _qwix

_HIGHEST = jax.lax.Precision.HIGHEST


def inverse_hessian_factor(h: jax.Array, percdamp: float) -> jax.Array:
  """U upper triangular with U^T U = (H' + lambda I)^{-1} (Qwix's damping).

  H' is H with 1 on the diagonal of dead columns; lambda = percdamp times the
  mean of the undamped diagonal of H (dead columns counting 0).
  """
  n = h.shape[-1]
  diag = jnp.diag(h)
  h = jnp.where((diag == 0) & jnp.eye(n, dtype=bool), 1.0, h)
  idx = jnp.arange(n)
  h = h.at[idx, idx].add(percdamp * jnp.mean(diag))
  hinv = jax.scipy.linalg.cho_solve(
    (jnp.linalg.cholesky(h), True), jnp.eye(n, dtype=h.dtype)
  )
  return jnp.triu(jnp.linalg.cholesky(hinv, upper=True))


def _find_params(w, how, groupsize):
  """Qwix's per-group (scale, zero_point) of every group of w (rows, in).

  Each group w[:, g*gs:(g+1)*gs] is calibrated alone, as
  `gptq_core.find_params` does; returns (rows or 1, groups) arrays.
  """
  groups = w.reshape(w.shape[0], -1, groupsize)
  find = lambda g: _qwix.compute_scale_zero_point(
    _qwix.calibrate(g, how), how.qtype
  )
  scale, zero_point = jax.vmap(find, in_axes=1, out_axes=1)(groups)
  return jax.tree.map(lambda x: x[..., 0], (scale, zero_point))


def _gptq(w, h, how, blocksize, percdamp):
  """GPTQ of one weight w (out, in) on H (in, in) -> QArray (Qwix's layout)."""
  rows, cols = w.shape
  groupsize = how.tiled_axes.get(1, cols)
  if not isinstance(groupsize, int) or cols % groupsize:
    raise ValueError(f'GPTQ needs an int tile dividing {cols}: {how}')
  blocks = -(-cols // blocksize)
  padded = blocks * blocksize
  pad = padded - cols
  # Padding columns: zero weights, identity rows / columns of U (decoupled).
  u = jnp.pad(
    inverse_hessian_factor(h.astype(jnp.float32), percdamp),
    ((0, pad), (0, pad)),
  )
  u = u + jnp.diag((jnp.arange(padded) >= cols).astype(u.dtype))
  w32 = jnp.where(jnp.diag(h) == 0, 0.0, w.astype(jnp.float32))
  w32 = jnp.pad(w32, ((0, 0), (0, pad)))
  group_of = jnp.minimum(jnp.arange(padded) // groupsize, cols // groupsize - 1)
  first_block = jnp.arange(cols // groupsize) * groupsize // blocksize
  # Transposed (in, out) inside: a column of W is a contiguous row. The
  # integers are kept in float32 (exact) until the end: int4 element stores
  # in the loop are ~10x slower on CPU.
  find = lambda wt: _find_params(wt[:cols].T, how, groupsize)

  def block(b, carry):
    """Scales of the groups starting here, the block's columns one by one,
    then the lazy update of every later column by one matmul."""
    wt, qt, scale, zero_point = carry
    i1 = b * blocksize
    new = first_block == b
    scale, zero_point = jax.tree.map(
      lambda old, f: jnp.where(new, f, old), (scale, zero_point), find(wt)
    )
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, blocksize, 0)
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, blocksize, 1)
    g1 = jax.lax.dynamic_slice_in_dim(group_of, i1, blocksize)
    s_t, z_t = jax.tree.map(jnp.transpose, (scale, zero_point))

    def column(i, carry):
      """Quantize column i, push its error onto the block's columns."""
      w1, err, q1 = carry
      row = lambda x, j: jax.lax.dynamic_index_in_dim(x, j, keepdims=False)
      put = lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, i, 0)
      wi, ui, g = row(w1, i), row(u1, i), row(g1, i)
      zp = None if z_t is None else row(z_t, g)
      q = _qwix.quantize_with_scale_zero_point(wi, how.qtype, row(s_t, g), zp)
      e = (wi - qwix.dequantize(q)) / row(ui, i)
      w1 = w1 - jnp.outer(ui, e)  # U upper: columns < i unchanged
      return w1, put(err, e), put(q1, q.qvalue.astype(jnp.float32))

    init = (
      jax.lax.dynamic_slice_in_dim(wt, i1, blocksize),
      jnp.zeros((blocksize, rows), wt.dtype),
      jax.lax.dynamic_slice_in_dim(qt, i1, blocksize),
    )
    _, err, q1 = jax.lax.fori_loop(0, blocksize, column, init)
    qt = jax.lax.dynamic_update_slice_in_dim(qt, q1, i1, 0)
    # Columns < i2 also change (U's block rows are not 0 there) but are done.
    wt = wt - jnp.matmul(u_rows.T, err, precision=_HIGHEST)
    return wt, qt, scale, zero_point

  wt = w32.T
  init = (wt, jnp.zeros((padded, rows), jnp.float32), *find(wt))
  _, qt, scale, zero_point = jax.lax.fori_loop(0, blocks, block, init)
  # Stored as Qwix's RTN stores the qtype: 'int3' / 'int5' in int4 / int8
  # with the logical qtype recorded, a dtype such as int4 as itself.
  stored = jax.eval_shape(
    lambda: _qwix.quantize_with_scale_zero_point(
      jnp.zeros((1,)), how.qtype, jnp.ones((1,)), None
    )
  )
  return qwix.QArray(
    qt[:cols].T.astype(stored.qvalue.dtype),
    scale.astype(w.dtype),
    zero_point,
    qtype=stored.qtype,
  )


def _static(how):
  """The hashable settings of `how` that GPTQ reads (not noise_fn: Qwix's
  GPTQ rounds without it)."""
  return (
    how.qtype,
    tuple(how.channelwise_axes),
    tuple(sorted(how.tiled_axes.items())),
    how.calibration_method,
  )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _quantize(w, h, static, blocksize, percdamp):
  qtype, channelwise, tiled, method = static
  how = _qwix.HowToQuantize(
    qtype=qtype,
    channelwise_axes=channelwise,
    tiled_axes=dict(tiled),
    calibration_method=method,
  )
  fn = functools.partial(_gptq, how=how, blocksize=blocksize, percdamp=percdamp)
  for _ in range(w.ndim - 2):
    fn = jax.vmap(fn)
  return fn(w, h)


def quantize_weight(
  w: jax.Array,
  h: jax.Array,
  how: _qwix.HowToQuantize,
  blocksize: int = 128,
  percdamp: float = 0.01,
) -> qwix.QArray:
  """GPTQ of w (out, in) on H (in, in), as `gptq_core.quantize_weight(w, H,
  how)[0]`: how has channelwise_axes [0] and tiled_axes {} or {1: tile}.

  Math in float32; the scale is returned in w's dtype.
  """
  return _quantize(w, h, _static(how), blocksize, percdamp)


def quantize_stacked(
  ws: jax.Array,
  hs: jax.Array,
  how: _qwix.HowToQuantize,
  blocksize: int = 128,
  percdamp: float = 0.01,
) -> qwix.QArray:
  """`quantize_weight` of each ws[i] (out, in) on hs[i] (in, in), as one
  vmapped call: a QArray whose arrays stack the n results on axis 0."""
  if ws.ndim != 3 or hs.ndim != 3:
    raise ValueError(
      f'Expect (n, out, in), (n, in, in): {ws.shape}, {hs.shape}'
    )
  return _quantize(ws, hs, _static(how), blocksize, percdamp)
