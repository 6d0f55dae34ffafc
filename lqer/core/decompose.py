"""The math of low-rank quantization-error reconstruction, on plain arrays.

Nothing here knows about Flax or Qwix. Every function takes arrays whose last
two axes are the (in, out) matrix of a kernel in Flax's convention y = x W and
broadcasts over any leading batch axes, so one jitted call handles a whole
group of same-shaped weights.

Given the quantization error E = W - deq(Q(W)) of shape (in, out), each method
picks a left transform T (in, in), takes the truncated SVD of T E and maps it
back:

    T E ~= U_k S_k V_k^T,   A = T^{-1} U_k S_k  (in, k),   B = V_k^T  (k, out).

* LQER  (plain SVD, aka LoRC):  T = I; best rank-k AB for ||E - AB||_F.
* L2QER (Zhang et al. 2024):    T = diag(s), s from mean |x| per input channel.
* QERA  (Zhang et al. 2025):    T = L^T with R = E[x^T x] = L L^T; AB minimises
  E_x ||x (E - AB)||^2 exactly, because E_x ||x D||^2 = ||L^T D||_F^2.

SVDQuant (Li et al. 2024) goes the other way: smooth, factor the weight
itself, quantize what is left (`smoothing_scale`, `svdquant_split`).

Quantized factors (`quantize_factors`): A rounded per column, then B refitted
by least squares on the same objective, min_B ||T (E - Â B)||_F, so the
branch absorbs A's rounding, then rounded per row.
"""

import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

METHODS = ('svd', 'l2qer', 'qera', 'svdquant')
SOLVERS = ('exact', 'randomized')


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def exact_svd(m: jax.Array, rank: int):
  """Top-`rank` singular triplets of m (..., p, q) by a full SVD.

  Returns (U_k (..., p, k), S_k (..., k), Vt_k (..., k, q)).
  """
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  return u[..., :rank], s[..., :rank], vt[..., :rank, :]


def _wide_svd(b: jax.Array, rank: int):
  """Top-`rank` singular triplets of a short, wide b (..., l, q).

  b^T = Q R (Q never formed), R^T = U S W^T, so b = U S (Q W)^T and
  V_k^T = S_k^{-1} U_k^T b: a QR of b^T and an l x l SVD instead of the
  full SVD of b (2-3x faster on CPU at l = 336, q = 11008). Rows of V^T
  whose singular value is 0 are 0 (their A columns are 0 too).
  """
  r = jnp.linalg.qr(_t(b), mode='r')
  u, s, _ = jnp.linalg.svd(_t(r), full_matrices=False)
  u, s = u[..., :rank], s[..., :rank]
  inv = jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1), 0)
  return u, s, inv[..., :, None] * _mm(_t(u), b)


def randomized_svd(
  m: jax.Array,
  rank: int,
  key: jax.Array,
  *,
  oversample: int = 16,
  power_iters: int = 2,
  krylov: bool = False,
):
  """Top-`rank` singular triplets of m (..., p, q), Halko-Martinsson-Tropp.

  Q_0 = qr(M G) with G ~ N(0, 1) of shape (q, l), l = rank + oversample;
  each power iteration Q_i = qr(M qr(M^T Q_{i-1})) sharpens the spectrum.
  The basis is Q = Q_n (subspace iteration) or, with `krylov`, the whole
  block Krylov space Q = qr([Q_0, ..., Q_n]) (Musco & Musco 2015): the same
  matmuls with M, but it converges like ~n^2 power iterations on the flat
  spectra of quantization errors. Then the SVD of the small Q^T M.
  Cost O(p q l) per power iteration instead of O(p q min(p, q)).
  Deterministic for a fixed key.
  """
  p, q = m.shape[-2:]
  width = min(rank + oversample, p, q)
  g = jax.random.normal(key, (*m.shape[:-2], q, width), m.dtype)
  basis, _ = jnp.linalg.qr(_mm(m, g))
  blocks = [basis]
  for _ in range(power_iters):
    # M^T Q as (Q^T M)^T: XLA:CPU runs this form ~2x faster.
    z, _ = jnp.linalg.qr(_t(_mm(_t(basis), m)))
    basis, _ = jnp.linalg.qr(_mm(m, z))
    blocks.append(basis)
  if krylov and power_iters:
    # At most min(p, q) columns (the latest blocks): beyond, it is exact.
    keep = max(1, min(p, q) // width)
    basis, _ = jnp.linalg.qr(jnp.concatenate(blocks[-keep:], -1))
  u_small, s, vt = _wide_svd(_mm(_t(basis), m), rank)
  return _mm(basis, u_small), s, vt


def top_singular(
  m,
  rank,
  *,
  solver='exact',
  key=None,
  oversample=16,
  power_iters=2,
  krylov=False,
):
  """Dispatches to `exact_svd` or `randomized_svd`."""
  if solver == 'exact':
    return exact_svd(m, rank)
  if solver == 'randomized':
    if key is None:
      key = jax.random.key(0)
    return randomized_svd(
      m,
      rank,
      key,
      oversample=oversample,
      power_iters=power_iters,
      krylov=krylov,
    )
  raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')


def l2qer_scale(act_abs_mean: jax.Array) -> jax.Array:
  """L2QER's per-input-channel scale from mean |x_i| (..., in).

  s = max(mean|x|, 1e-4) / sqrt(min(s) max(s)), so that the scales are
  centred on 1 in log space.
  """
  s = jnp.maximum(act_abs_mean.astype(jnp.float32), 1e-4)
  norm = jnp.sqrt(s.min(axis=-1, keepdims=True) * s.max(axis=-1, keepdims=True))
  return s / norm


@jax.jit
def damped_cholesky(second_moment: jax.Array, damping: float) -> jax.Array:
  """Lower Cholesky factor L of R + damping * mean(diag R) I  (..., in, in).

  Returns NaNs where the damped matrix is not positive definite; callers
  check with `jnp.isfinite`.
  """
  r = second_moment.astype(jnp.float32)
  r = 0.5 * (r + _t(r))
  diag_mean = jnp.mean(jnp.diagonal(r, axis1=-2, axis2=-1), axis=-1)
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  return jnp.linalg.cholesky(r + damping * diag_mean[..., None, None] * eye)


def smoothing_scale(act_abs_max, weight, alpha):
  """SmoothQuant's per-input-channel scale lam (..., in) of W (..., in, out):

      lam_j = max|x_j|^alpha / max_o |W_jo|^(1 - alpha),

  both maxima clamped at 1e-5, and lam_j = 1 where calibration never saw
  channel j (max|x_j| = 0): no evidence to move it by, and a tiny lam would
  blow the channel up in x' the day it fires. x' = x / lam and W' =
  diag(lam) W keep x W = x' W' and move activation outliers into the weight.
  """
  seen = act_abs_max.astype(jnp.float32)
  x = jnp.maximum(seen, 1e-5)
  w = jnp.maximum(jnp.max(jnp.abs(weight.astype(jnp.float32)), axis=-1), 1e-5)
  return jnp.where(seen > 0, x**alpha / w ** (1 - alpha), 1.0)


def svdquant_split(weight, lam, rank, **solver_kw):
  """SVDQuant: W' = diag(lam) W = L1 L2 + R, L1 L2 the top-k SVD of W'.

  weight: (..., in, out); lam: (..., in). Returns (A, B, R) with
  A = diag(1/lam) L1 (..., in, k), B = L2 (..., k, out) and the residual
  R (..., in, out), so that x W = (x / lam) R + (x A) B: the branch reads
  x A = x' L1. Rank 0: A, B empty, R = W' (smoothing alone).
  """
  smoothed = lam[..., :, None] * weight.astype(jnp.float32)
  if rank == 0:
    a = jnp.zeros((*smoothed.shape[:-1], 0), jnp.float32)
    b = jnp.zeros((*smoothed.shape[:-2], 0, smoothed.shape[-1]), jnp.float32)
    return a, b, smoothed
  u, sv, vt = top_singular(smoothed, rank, **solver_kw)
  l1 = u * sv[..., None, :]
  return l1 / lam[..., :, None], vt, smoothed - _mm(l1, vt)


def svd_factors(error, rank, **solver_kw):
  """LQER: A = U_k S_k, B = V_k^T from the SVD of E (..., in, out)."""
  u, s, vt = top_singular(error, rank, **solver_kw)
  return u * s[..., None, :], vt


def l2qer_factors(error, act_abs_mean, rank, **solver_kw):
  """L2QER: SVD of diag(s) E; A = diag(1/s) U_k S_k, B = V_k^T.

  error: (..., in, out); act_abs_mean: (..., in) mean |x| per input channel.
  """
  s = l2qer_scale(act_abs_mean)[..., :, None]
  u, sv, vt = top_singular(s * error, rank, **solver_kw)
  return (u * sv[..., None, :]) / s, vt


def qera_factors(error, chol, rank, **solver_kw):
  """QERA-exact: SVD of L^T E; A = L^{-T} U_k S_k, B = V_k^T.

  error: (..., in, out); chol: (..., in, in) lower factor of E[x^T x].
  """
  u, sv, vt = top_singular(_mm(_t(chol), error), rank, **solver_kw)
  a = jax.scipy.linalg.solve_triangular(
    _t(chol), u * sv[..., None, :], lower=False
  )
  return a, vt


def weigh(m, method, *, act_abs_mean=None, chol=None, lam=None):
  """T m for the method's left transform T (m: (..., in, n)): I for 'svd',
  diag(s) for 'l2qer', L^T for 'qera', diag(lam) for 'svdquant' (its branch
  approximates the smoothed weight); ||T D||_F^2 is the method's objective
  of a residual D."""
  if method == 'svdquant':
    return lam[..., :, None] * m
  if method == 'svd':
    return m
  if method == 'l2qer':
    return l2qer_scale(act_abs_mean)[..., :, None] * m
  if method == 'qera':
    return _mm(_t(chol), m)
  raise ValueError(f'no error objective for method {method!r}')


def quantize_symmetric(m, bits, axis):
  """(q, scale): m ~= q * scale, one absmax scale per slice along `axis`
  (the axis reduced), q = round(m / scale) in [-(2^(b-1) - 1), 2^(b-1) - 1].
  """
  qmax = 2 ** (bits - 1) - 1
  amax = jnp.max(jnp.abs(m), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  return jnp.clip(jnp.round(m / scale), -qmax, qmax), scale


def refit_right(weighted_error, weighted_a):
  """B = argmin ||T E - (T Â) B||_F (..., k, out), by normal equations on
  unit-norm columns of T Â (near orthogonal: well conditioned); zero columns
  (cut or empty components) give zero rows."""
  norms = jnp.linalg.norm(weighted_a, axis=-2)
  safe = jnp.where(norms > 0, norms, 1.0)
  m = weighted_a / safe[..., None, :]
  gram = _mm(_t(m), m) + jnp.vectorize(jnp.diag, signature='(k)->(k,k)')(
    (norms == 0).astype(m.dtype)
  )
  rhs = _mm(_t(m), weighted_error)
  chol = jnp.linalg.cholesky(gram)
  b = jax.scipy.linalg.cho_solve((chol, True), rhs)
  return b / safe[..., :, None]


def quantize_factors(error, a, bits, method, **stats):
  """Quantized factors of E ~= A B: (qa, sa, qb, sb), A ~= qa * sa with sa
  (..., 1, k), B ~= qb * sb with sb (..., k, 1).

  A is rounded per column; B is refitted to min ||T (E - Â B)||_F
  (`weigh`, `refit_right`) with Â = qa * sa, then rounded per row.
  """
  qa, sa = quantize_symmetric(a, bits, axis=-2)
  b = refit_right(
    weigh(error, method, **stats), weigh(qa * sa, method, **stats)
  )
  qb, sb = quantize_symmetric(b, bits, axis=-1)
  return qa, sa, qb, sb


def component_energy(a, method, **stats):
  """||T A_j||^2 per column (..., k): for A = T^{-1} U S the squared
  singular values, each what its rank-1 term removes from ||T E||_F^2."""
  return jnp.sum(jnp.square(weigh(a, method, **stats)), axis=-2)


@functools.partial(
  jax.jit,
  static_argnames=(
    'rank',
    'method',
    'solver',
    'oversample',
    'power_iters',
    'krylov',
  ),
)
def reconstruct(
  error: jax.Array,
  rank: int,
  method: str = 'svd',
  *,
  act_abs_mean: jax.Array | None = None,
  chol: jax.Array | None = None,
  solver: str = 'exact',
  key: jax.Array | None = None,
  oversample: int = 16,
  power_iters: int = 2,
  krylov: bool = False,
):
  """Rank-k factors (A, B) of E (..., in, out) for `method`, in float32.

  'svd' needs nothing else, 'l2qer' needs act_abs_mean (..., in), 'qera'
  needs chol (..., in, in) from `damped_cholesky`.
  """
  kw = dict(
    solver=solver,
    key=key,
    oversample=oversample,
    power_iters=power_iters,
    krylov=krylov,
  )
  error = error.astype(jnp.float32)
  if method == 'svd':
    return svd_factors(error, rank, **kw)
  if method == 'l2qer':
    return l2qer_factors(error, act_abs_mean, rank, **kw)
  if method == 'qera':
    return qera_factors(error, chol, rank, **kw)
  if method == 'svdquant':
    raise ValueError(
      "'svdquant' factors the weight, not an error: use"
      ' smoothing_scale and svdquant_split'
    )
  raise ValueError(f'method must be one of {METHODS}, got {method!r}')
