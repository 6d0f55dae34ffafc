"""Independent NumPy implementations used as references by the tests.

Written from the formulas in design.md, sharing no code with lqer: float64
NumPy, full SVDs, and QERA through the symmetric square root of R (an
eigendecomposition) instead of lqer's Cholesky route.
"""

import numpy as np


def quantize_symmetric(w, bits, group=None):
  """Absmax int quantization of w (in, out) per output channel (and group).

  Returns the dequantized weight. Groups run along the input axis. As in
  Qwix, the bound is qmax + 0.5 so the top bucket is fully used.
  """
  w = np.asarray(w, np.float32)
  qmax = 2 ** (bits - 1) - 1
  n_in, n_out = w.shape
  g = group or n_in
  wg = w.reshape(n_in // g, g, n_out)
  scale = np.abs(wg).max(axis=1, keepdims=True) / np.float32(qmax + 0.5)
  scale = np.where(scale == 0, 1.0, scale)
  q = np.clip(np.round(wg / scale), -qmax, qmax)
  return (q * scale).reshape(n_in, n_out)


def svd_factors(e, rank):
  u, s, vt = np.linalg.svd(np.asarray(e, np.float64), full_matrices=False)
  return u[:, :rank] * s[:rank], vt[:rank]


def l2qer_factors(e, act_abs_mean, rank):
  s = np.maximum(np.asarray(act_abs_mean, np.float64), 1e-4)
  s = s / np.sqrt(s.min() * s.max())
  u, sv, vt = np.linalg.svd(s[:, None] * e, full_matrices=False)
  return (u[:, :rank] * sv[:rank]) / s[:, None], vt[:rank]


def qera_product(e, second_moment, rank, damping):
  """The optimal rank-k A B for E_x||x (E - AB)||^2 via R^{1/2}."""
  r = np.asarray(second_moment, np.float64)
  r = r + damping * np.mean(np.diag(r)) * np.eye(len(r))
  vals, vecs = np.linalg.eigh(r)
  root = (vecs * np.sqrt(vals)) @ vecs.T
  inv_root = (vecs / np.sqrt(vals)) @ vecs.T
  u, s, vt = np.linalg.svd(root @ e, full_matrices=False)
  return inv_root @ (u[:, :rank] * s[:rank]) @ vt[:rank]


def output_error(x, w, w_hat):
  """||X (W - W_hat)||_F / ||X W||_F."""
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)


def correlated_outlier_activations(rng, n, d, n_outliers=4, scale=30.0):
  """Tokens (n, d) with correlated channels and a few huge outlier channels."""
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  x = rng.normal(size=(n, d)) @ (np.eye(d) + 2 * mix)
  x[:, rng.choice(d, n_outliers, replace=False)] *= scale
  return x.astype(np.float32)
