"""Output probes: how much a weight's perturbation moves the model output.

`output_damage` estimates, for every probed weight and perturbation at
once, the first-order output change ||J_w D||^2 (Hutchinson, backward
passes with random output directions); `OutputProbe.distance` measures the
actual output change when weights are replaced. Rank allocation
(`lqer.offline.allocation.Budget(probe=...)`) uses both.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer import _qwix
from lqer.core.paths import path_str


def output_sensitivity(
  apply_fn,
  fp_params,
  ptq_params,
  batches,
  *,
  probes=16,
  seed=0,
  output='gaussian',
) -> dict:
  """How far each weight's Qwix PTQ error alone moves the model output.

  Args:
    apply_fn: apply_fn(params, *batch) -> output pytree.
    fp_params: the float params (pure dict).
    ptq_params: the same tree quantized by Qwix PTQ (its errors D_w).
    batches: a list of argument tuples, examples on axis 0.
    probes, seed, output: as `OutputProbe`'s.

  Returns:
    {path: ||J_w D_w||^2 / ||f||^2}, to first order (`output_damage`).
  """
  flat_fp = flax.traverse_util.flatten_dict(fp_params)
  flat_q = flax.traverse_util.flatten_dict(ptq_params)
  deltas = {
    p: (
      qwix.dequantize(q.array).reshape(flat_fp[p].shape).astype(jnp.float32)
      - flat_fp[p].astype(jnp.float32)
    )[None]
    for p, q in flat_q.items()
    if isinstance(q, _qwix.WithAux)
  }
  damage = OutputProbe(apply_fn, batches, probes, seed, output).damage(
    fp_params, deltas
  )
  return {p: float(v[0]) for p, v in damage.items()}


@dataclasses.dataclass(frozen=True)
class OutputProbe:
  """How `output_damage` probes a model.

  Attributes:
    apply_fn: apply_fn(params, *batch) -> output pytree, params as given to
      `lqer_quantize_params` (for NNX, the pure dict: e.g. `m = make_model();
      nnx.update(m, params); return m(*batch)`).
    batches: a list of argument tuples, examples on axis 0.
    probes: random directions per example.
    seed: their seed.
    output: 'gaussian' (any output) or 'softmax' (logits: Fisher directions).
  """

  apply_fn: Callable[..., Any]
  batches: Sequence[Any]
  probes: int = 16
  seed: int = 0
  output: str = 'gaussian'

  def __post_init__(self):
    if self.output not in ('gaussian', 'softmax'):
      raise ValueError(
        f"output={self.output!r}: use 'gaussian' (any output)"
        " or 'softmax' (logits)"
      )

  def damage(self, fp_params, deltas) -> dict:
    """`output_damage` of fp_params under deltas {path: (K, *W.shape)}."""
    return output_damage(self, fp_params, deltas)

  def distance(self, fp_params, weights: dict) -> float:
    """How far the output moves when the weights {path: W_hat} replace
    theirs, over the batches: KL(p_fp ‖ p_hat) per position ('softmax'), or
    ||f_hat - f||^2 / ||f||^2 ('gaussian')."""
    flat = flax.traverse_util.flatten_dict(fp_params)
    moved = flax.traverse_util.unflatten_dict(flat | weights)
    fp_params = flax.traverse_util.unflatten_dict(flat)  # the same pytree
    total, norm = 0.0, 0.0
    for batch in self.batches:
      d, n = _divergence(
        self.output,
        _apply(self.apply_fn, fp_params, tuple(batch)),
        _apply(self.apply_fn, moved, tuple(batch)),
      )
      total, norm = total + float(d), norm + float(n)
    return total / norm


def output_damage(probe: OutputProbe, fp_params, deltas) -> dict:
  """First-order output change of each weight's perturbations.

  ||J_w D_k||^2 / ||f||^2, J_w the Jacobian of the output f in W_w, is
  estimated for every weight and perturbation at once (Hutchinson): for v ~
  N(0, I) over the output, E_v[<v, J_w D>^2] = ||J_w D||^2 and <v, J_w D> =
  <J_w^T v, D>, so each of `probe.probes` backward passes gives a sample for
  all of them. Examples (the leading axis of every batch argument) are probed
  each on its own: relative std ~ sqrt(2 / (probes * examples)).
  output='softmax': each position's v = onehot(y) - p with y ~ p, so
  E[v v^T] is the Fisher of the prediction, and the value is twice the mean
  KL(p_fp || p_w) per position to second order.

  Args:
    probe: the `OutputProbe`.
    fp_params: the float params (pure dict).
    deltas: {path: (K, *W.shape) perturbations D_k of that weight}.

  Returns:
    {path: (K,) ||J_w D_k||^2 / ||f||^2}.
  """
  flat_fp = flax.traverse_util.flatten_dict(fp_params)
  paths = list(deltas)
  for p in paths:
    if p not in flat_fp or deltas[p].shape[1:] != flat_fp[p].shape:
      raise ValueError(
        f'output_damage: {path_str(p)} has perturbations of shape'
        f' {deltas[p].shape[1:]}, but the params hold'
        f' {getattr(flat_fp.get(p), "shape", "no such weight")}'
      )

  def example(params, weights, deltas, inputs, key):
    """One example's squared <J_w^T v, D_k> (gradients of the probed
    weights only), mean over probes, and its output energy (or positions)."""

    def apply(weights):
      flat = flax.traverse_util.flatten_dict(params) | dict(zip(paths, weights))
      return probe.apply_fn(
        flax.traverse_util.unflatten_dict(flat), *(x[None] for x in inputs)
      )

    out, pullback = jax.vjp(apply, weights)
    leaves, treedef = jax.tree.flatten(out)

    def one(k):
      vs = [
        direction(probe.output, kk, x)
        for kk, x in zip(jax.random.split(k, len(leaves)), leaves)
      ]
      grads = pullback(jax.tree.unflatten(treedef, vs))[0]
      return [
        jnp.tensordot(d, g.astype(jnp.float32), g.ndim)
        for g, d in zip(grads, deltas)
      ]

    if probe.output == 'softmax':
      energy = sum(x.size // x.shape[-1] for x in leaves)
    else:
      energy = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    inner = jax.lax.map(one, jax.random.split(key, probe.probes))
    return [jnp.mean(jnp.square(x), axis=0) for x in inner], energy

  @jax.jit
  def run(params, weights, deltas, batch, key):
    keys = jax.random.split(key, len(batch[0]))
    moved, energy = jax.lax.map(  # vmapped 8 at a time
      lambda a: example(params, weights, deltas, *a),
      (batch, keys),
      batch_size=min(8, len(keys)),
    )
    return [jnp.sum(m, axis=0) for m in moved], jnp.sum(energy)

  weights = [flat_fp[p] for p in paths]
  stacked = [deltas[p].astype(jnp.float32) for p in paths]
  moved, energy = [0.0] * len(paths), 0.0
  for i, batch in enumerate(probe.batches):
    m, e = run(
      fp_params,
      weights,
      stacked,
      tuple(batch),
      jax.random.fold_in(jax.random.key(probe.seed), i),
    )
    moved = [a + np.asarray(b, np.float64) for a, b in zip(moved, m)]
    energy += float(e)
  return {p: v / energy for p, v in zip(paths, moved)}


def direction(output, key, x):
  """A random direction v over an output array x: N(0, I) ('gaussian'), or
  per position onehot(y) - p, y ~ p = softmax(x) ('softmax': E[v v^T] is
  the Fisher of the prediction)."""
  if output == 'gaussian':
    return jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
  p = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
  y = jax.random.categorical(key, x.astype(jnp.float32), axis=-1)
  return (jax.nn.one_hot(y, x.shape[-1]) - p).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _apply(apply_fn, params, batch):
  return jax.tree.leaves(apply_fn(params, *batch))


@functools.partial(jax.jit, static_argnums=0)
def _divergence(output, fp_out, out):
  """(summed divergence, normaliser) of one batch's outputs: KL(p_fp ‖ p)
  and positions ('softmax'), or ||f - f_fp||^2 and ||f_fp||^2."""
  pairs = [
    (f.astype(jnp.float32), g.astype(jnp.float32)) for f, g in zip(fp_out, out)
  ]
  if output == 'softmax':
    return (
      sum(
        jnp.sum(
          jax.nn.softmax(f) * (jax.nn.log_softmax(f) - jax.nn.log_softmax(g))
        )
        for f, g in pairs
      ),
      sum(f.size // f.shape[-1] for f, _ in pairs),
    )
  return (
    sum(jnp.sum(jnp.square(g - f)) for f, g in pairs),
    sum(jnp.sum(jnp.square(f)) for f, _ in pairs),
  )
