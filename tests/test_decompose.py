"""The math core against the NumPy references, on arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqer.core import decompose
from lqer.core import metrics
from tests import reference


def _error(rng, n_in=64, n_out=48, bits=4):
  w = rng.normal(size=(n_in, n_out)).astype(np.float32)
  return w, w - reference.quantize_symmetric(w, bits).astype(np.float32)


def _product(a, b):
  return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


@pytest.mark.parametrize('rank', [1, 8, 32])
def test_svd_factors_match_numpy(rank):
  _, e = _error(np.random.default_rng(0))
  a, b = decompose.reconstruct(jnp.asarray(e), rank, 'svd')
  ra, rb = reference.svd_factors(e, rank)
  np.testing.assert_allclose(_product(a, b), ra @ rb, atol=2e-5)


def test_full_rank_reconstructs_error_exactly():
  _, e = _error(np.random.default_rng(1), 40, 24)
  a, b = decompose.reconstruct(jnp.asarray(e), 24, 'svd')
  np.testing.assert_allclose(_product(a, b), e, atol=1e-5)


@pytest.mark.parametrize('rank', [4, 16])
def test_l2qer_matches_numpy(rank):
  rng = np.random.default_rng(2)
  _, e = _error(rng)
  x = reference.correlated_outlier_activations(rng, 512, 64)
  abs_mean = np.abs(x).mean(0)
  a, b = decompose.reconstruct(
    jnp.asarray(e), rank, 'l2qer', act_abs_mean=jnp.asarray(abs_mean)
  )
  ra, rb = reference.l2qer_factors(e, abs_mean, rank)
  np.testing.assert_allclose(_product(a, b), ra @ rb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('rank', [4, 16])
@pytest.mark.parametrize('damping', [1e-3, 0.1])
def test_qera_matches_numpy_eigen_route(rank, damping):
  rng = np.random.default_rng(3)
  _, e = _error(rng)
  x = reference.correlated_outlier_activations(rng, 512, 64)
  r = x.T.astype(np.float64) @ x / len(x)
  chol = decompose.damped_cholesky(jnp.asarray(r, jnp.float32), damping)
  a, b = decompose.reconstruct(jnp.asarray(e), rank, 'qera', chol=chol)
  expected = reference.qera_product(e, r, rank, damping)
  np.testing.assert_allclose(
    _product(a, b), expected, atol=2e-4 * np.abs(expected).max()
  )


@pytest.mark.parametrize('rank', [1, 4, 16, 32])
def test_qera_is_best_on_output_error(rank):
  """QERA is the optimum for the calibration distribution: it never loses."""
  rng = np.random.default_rng(4)
  for _ in range(3):
    w, e = _error(rng)
    x = reference.correlated_outlier_activations(rng, 2048, 64)
    r = x.T.astype(np.float64) @ x / len(x)
    base = w - e
    chol = decompose.damped_cholesky(jnp.asarray(r, jnp.float32), 1e-6)
    errs = {}
    for method, kw in [
      ('svd', {}),
      ('l2qer', {'act_abs_mean': jnp.abs(x).mean(0)}),
      ('qera', {'chol': chol}),
    ]:
      a, b = decompose.reconstruct(jnp.asarray(e), rank, method, **kw)
      errs[method] = reference.output_error(x, w, base + _product(a, b))
    assert errs['qera'] <= errs['l2qer'] * (1 + 1e-4), errs
    assert errs['qera'] <= errs['svd'] * (1 + 1e-4), errs


@pytest.mark.parametrize('method', ['svd', 'qera'])
def test_error_non_increasing_in_rank(method):
  rng = np.random.default_rng(5)
  w, e = _error(rng)
  x = reference.correlated_outlier_activations(rng, 1024, 64)
  r = jnp.asarray(x.T @ x / len(x))
  kw = {'chol': decompose.damped_cholesky(r, 1e-4)} if method == 'qera' else {}
  prev = np.inf
  for rank in [1, 2, 4, 8, 16, 32, 48]:
    a, b = decompose.reconstruct(jnp.asarray(e), rank, method, **kw)
    err = (
      reference.output_error(x, w, w - e + _product(a, b))
      if (method == 'qera')
      else np.linalg.norm(e - _product(a, b))
    )
    assert err <= prev * (1 + 1e-5)
    prev = err


def test_randomized_svd_close_to_exact_on_decaying_spectrum():
  rng = np.random.default_rng(6)
  u, _ = np.linalg.qr(rng.normal(size=(200, 200)))
  v, _ = np.linalg.qr(rng.normal(size=(120, 120)))
  s = 0.8 ** np.arange(120)
  m = jnp.asarray((u[:, :120] * s) @ v.T, jnp.float32)
  _, s_exact, _ = decompose.exact_svd(m, 10)
  u_r, s_r, vt_r = decompose.randomized_svd(m, 10, jax.random.key(0))
  np.testing.assert_allclose(s_r, s_exact, rtol=1e-4)
  m_exact = _product(*decompose.svd_factors(m, 10))
  np.testing.assert_allclose(_product(u_r * s_r, vt_r), m_exact, atol=1e-5)


def _captured(e, a, b):
  """||E||^2 - ||E - AB||^2 in float64."""
  e = np.asarray(e, np.float64)
  return np.sum(e**2) - np.sum((e - _product(a, b)) ** 2)


def test_krylov_beats_subspace_iteration_on_quantization_error():
  # A near-white int4 error: the flat spectrum where power iteration is slow.
  _, e = _error(np.random.default_rng(8), 256, 192)
  exact = _captured(e, *reference.svd_factors(e, 16))
  energy = {}
  for krylov in [False, True]:
    a, b = decompose.reconstruct(
      jnp.asarray(e),
      16,
      'svd',
      solver='randomized',
      key=jax.random.key(0),
      oversample=8,
      power_iters=3,
      krylov=krylov,
    )
    energy[krylov] = _captured(e, a, b) / exact
  # Same matmuls with E; the Krylov basis keeps every iterate.
  assert 0.9 < energy[False] < energy[True] <= 1 + 1e-5, energy
  assert energy[True] > 0.98, energy


def test_krylov_space_as_wide_as_the_matrix_is_exact():
  # 8 iterations of 12 columns > min(40, 30): the basis is capped at the
  # latest blocks that fit and spans the whole column space.
  _, e = _error(np.random.default_rng(9), 40, 30)
  a, b = decompose.reconstruct(
    jnp.asarray(e),
    5,
    'svd',
    solver='randomized',
    key=jax.random.key(0),
    oversample=7,
    power_iters=8,
    krylov=True,
  )
  ra, rb = reference.svd_factors(e, 5)
  np.testing.assert_allclose(_product(a, b), ra @ rb, atol=1e-4)


@pytest.mark.parametrize(
  'shape,true_rank', [((12, 300), 12), ((12, 300), 3), ((30, 20), 20)]
)
def test_wide_svd_matches_numpy(shape, true_rank):
  rng = np.random.default_rng(10)
  m = rng.normal(size=(shape[0], true_rank)) @ rng.normal(
    size=(true_rank, shape[1])
  )
  u, s, vt = decompose._wide_svd(jnp.asarray(m, jnp.float32), 5)
  ru, rs, rvt = np.linalg.svd(m, full_matrices=False)
  np.testing.assert_allclose(s, rs[:5], rtol=1e-4, atol=1e-4)
  k = min(5, true_rank)
  np.testing.assert_allclose(
    _product(u[:, :k] * s[:k], vt[:k]),
    (ru[:, :k] * rs[:k]) @ rvt[:k],
    atol=1e-3 * rs[0],
  )
  # Zero singular values give zero rows, not NaNs.
  assert np.all(np.isfinite(vt))


def test_randomized_is_deterministic_and_batched():
  rng = np.random.default_rng(7)
  ms = jnp.asarray(rng.normal(size=(3, 50, 40)), jnp.float32)
  key = jax.random.key(3)
  a1, b1 = decompose.reconstruct(ms, 5, 'svd', solver='randomized', key=key)
  a2, b2 = decompose.reconstruct(ms, 5, 'svd', solver='randomized', key=key)
  assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
  assert a1.shape == (3, 50, 5) and b1.shape == (3, 5, 40)
  for i in range(3):
    # Each slice of the batched call factors that matrix: it captures (nearly)
    # what its exact top-5 SVD captures, as the unbatched call does.
    exact = _captured(ms[i], *reference.svd_factors(ms[i], 5))
    single = _captured(
      ms[i],
      *decompose.reconstruct(ms[i], 5, 'svd', solver='randomized', key=key),
    )
    assert _captured(ms[i], a1[i], b1[i]) >= 0.97 * exact
    assert single >= 0.97 * exact


def test_l2qer_scale_formula():
  s = decompose.l2qer_scale(jnp.array([0.0, 1e-5, 0.5, 2.0]))
  expected = np.array([1e-4, 1e-4, 0.5, 2.0]) / np.sqrt(1e-4 * 2.0)
  np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_metrics_match_numpy():
  rng = np.random.default_rng(8)
  w = rng.normal(size=(32, 16)).astype(np.float32)
  w_hat = w + 0.1 * rng.normal(size=w.shape).astype(np.float32)
  x = reference.correlated_outlier_activations(rng, 4096, 32)
  r = x.T.astype(np.float64) @ x / len(x)
  np.testing.assert_allclose(
    metrics.relative_output_error(w, w_hat, jnp.asarray(r, jnp.float32)),
    reference.output_error(x, w, w_hat),
    rtol=1e-4,
  )
  rel = np.linalg.norm(w - w_hat) / np.linalg.norm(w)
  np.testing.assert_allclose(
    metrics.relative_weight_error(w, w_hat), rel, rtol=1e-5
  )
  np.testing.assert_allclose(
    metrics.snr_db(w, w_hat), -20 * np.log10(rel), rtol=1e-5
  )


def test_default_randomized_qera_is_near_exact_where_it_sketches():
  """QERA with the rule's default solver (randomized, block Krylov, 4
  power iterations, oversample 16) on a 384 x 256 int4 error at rank 16:
  its Krylov basis (5 x 32 = 160 columns) is narrower than the matrix, so
  this is the sketch, not an exact SVD in disguise. It keeps >= 99 % of the
  output-error reduction of the exact solver (NumPy reference objective)."""
  rng = np.random.default_rng(11)
  w, e = _error(rng, 384, 256)
  x = reference.correlated_outlier_activations(rng, 4096, 384)
  r = x.T.astype(np.float64) @ x / len(x)
  chol = decompose.damped_cholesky(jnp.asarray(r, jnp.float32), 0.01)
  got = {}
  for solver in ('randomized', 'exact'):
    a, b = decompose.qera_factors(
      jnp.asarray(e),
      chol,
      16,
      solver=solver,
      key=jax.random.key(0),
      oversample=16,
      power_iters=4,
      krylov=True,
    )
    got[solver] = reference.output_error(x, e, _product(a, b))
  ptq = reference.output_error(x, e, np.zeros_like(e))
  assert got['exact'] < ptq
  assert ptq - got['randomized'] >= 0.99 * (ptq - got['exact']), got
