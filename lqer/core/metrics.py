"""Error measures on plain arrays (float32), batched over leading axes.

W is the float weight (..., in, out), W_hat its reconstruction, D = W - W_hat.
With R = E[x^T x] the second moment of the layer's input, the expected
squared output error is E_x ||x D||^2 = tr(D^T R D), so output errors on the
calibration distribution need no second pass over the data.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _sq(x):
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1))


def relative_weight_error(w, w_hat):
  """||W - W_hat||_F / ||W||_F."""
  return jnp.sqrt(_sq(w - w_hat) / _sq(w))


def snr_db(w, w_hat):
  """10 log10(||W||^2 / ||W - W_hat||^2)."""
  return 10.0 * jnp.log10(_sq(w) / jnp.maximum(_sq(w - w_hat), 1e-30))


def expected_output_energy(d, second_moment):
  """E_x ||x D||^2 = tr(D^T R D) for D (..., in, out), R (..., in, in)."""
  d = d.astype(jnp.float32)
  rd = jnp.matmul(second_moment.astype(jnp.float32), d, precision=_HIGHEST)
  return jnp.sum(d * rd, axis=(-2, -1))


def relative_output_error(w, w_hat, second_moment):
  """sqrt(E||x (W - W_hat)||^2 / E||x W||^2) on the distribution of R."""
  num = expected_output_energy(w - w_hat, second_moment)
  den = expected_output_energy(w, second_moment)
  return jnp.sqrt(jnp.maximum(num, 0.0) / den)


def error_bound_terms(x, x_q, w, w_q):
  """The two terms of SVDQuant's bound on ||X W - Q(X) Q(W)||_F:

      ||X|| ||W - Q(W)||   and   ||X - Q(X)|| (||W|| + ||W - Q(W)||)

  (Frobenius norms; x, x_q: (tokens, in), w, w_q: (in, out)). The first is
  the weight's error, the second the activation's.
  """
  norm = lambda m: jnp.sqrt(_sq(m))
  w_err = norm(w - w_q)
  return norm(x) * w_err, norm(x - x_q) * (norm(w) + w_err)
