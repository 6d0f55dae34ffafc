"""Rank allocation under a budget of extra bits per weight (rank='auto').

A weight's rank-i term removes g_i = ||T A_i||^2 = sigma_i^2 from its
method's objective ||T (E - A B)||_F^2 (`decompose.component_energy`); on
the calibration distribution that is output error removed. To compare
layers, gains are put on one scale (`Budget`): by default each is the
fraction of its layer's output energy ||T W||_F^2 it removes times the
layer's size (the report's size-weighted total); with a measured
`output_sensitivity`, the model output damage it undoes: the output change
(first order) from that weight's error alone times the fraction of the
weight's error the term removes (measured better: README). Each term costs the same bits
within a weight (`component_bits`), and gains decrease with i, so taking
terms by gain per bit, largest first, while they fit is the greedy solution
of this knapsack (optimal up to the last term) and always takes a prefix of
each weight's terms: its rank. Ties go to the earlier weight (param order),
so the allocation is deterministic.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from qwix._src.core import qarray
from qwix._src.providers import ptq



def component_bits(layout, rule) -> int:
  """Stored bits of one rank of a weight's A B: batch (in + out) values
  (factor_qtype's bits, else factor_dtype's), plus a scale for the column
  of A and one for the row of B when quantized."""
  batch = math.prod(layout.batch_shape)
  dtype_bits = np.dtype(rule.factor_dtype).itemsize * 8
  bits = batch * (layout.in_size + layout.out_size) * (
      rule.factor_bits or dtype_bits)
  if rule.factor_qtype is not None:
    bits += 2 * batch * dtype_bits
  return bits


def fixed_bits(job) -> int:
  """Extra bits a job spends whatever the allocation: the factors of a
  fixed rank, and a per-input-channel scale (AWQ, SVDQuant) in float32."""
  bits = 0 if job.rule.auto_rank else job.rank * component_bits(job.layout, job.rule)
  if job.svdquant and job.rule.error_rank:
    bits += job.rule.error_rank * component_bits(job.layout, job.rule)
  if job.svdquant or job.base_kind in ('awq', 'stored-awq'):
    bits += math.prod(job.layout.batch_shape) * job.layout.in_size * 32
  return bits


@dataclasses.dataclass
class Budget:
  """`bits_per_weight` extra bits, averaged over `num_weights` (every
  element of every weight the call quantizes; set by lqer_quantize_params).

  How terms of different weights compare: with `sensitivity` (from
  `output_sensitivity`), by the model output damage each undoes; else by
  `normalize` (`_normalized`), default 'size': the fraction of the layer's
  output energy removed times its size, so the greedy lowers the report's
  size-weighted total output error.
  """

  bits_per_weight: float
  num_weights: int = 0
  normalize: str = 'size'
  sensitivity: dict | None = None
  spent_bits: int = 0
  ranks: dict = dataclasses.field(default_factory=dict)
  _left: int = 0
  _costs: dict = dataclasses.field(default_factory=dict)
  _sizes: dict = dataclasses.field(default_factory=dict)

  def set_max_ranks(self, jobs):
    """Sets each 'auto' job's rank to the largest it may get: its rule's
    max_rank or twice the uniform rank that spends the budget (rounded up
    to 8), at most min(in, out)."""
    auto = [j for j in jobs if j.rule.auto_rank]
    if not auto:
      raise ValueError(
          'lqer_quantize_params: budget_bits is given but no weight has a'
          " rule with rank='auto'; set LqerRule(rank='auto') on the rules"
          ' whose ranks should be allocated')
    fixed = sum(fixed_bits(j) for j in jobs)
    self._left = math.floor(self.bits_per_weight * self.num_weights) - fixed
    if self._left < 0:
      raise ValueError(
          f'budget_bits={self.bits_per_weight}: the fixed-rank factors and'
          f' input scales already spend {fixed / self.num_weights:.4f} extra'
          ' bits per weight; raise the budget or lower the fixed ranks')
    self._costs = {j.path: component_bits(j.layout, j.rule) for j in auto}
    self._sizes = {j.path: math.prod(j.layout.shape) for j in auto}
    uniform = self._left / sum(self._costs.values())
    default = max(8, 8 * math.ceil(2 * uniform / 8))
    for job in auto:
      job.rank = min(job.layout.max_rank, job.rule.max_rank or default)
    self.spent_bits = fixed

  def allocate(self, spectra: dict) -> dict:
    """{path: rank} from each 'auto' weight's (gains (k,), (||T W||^2,
    ||T E||^2))."""
    paths = list(spectra)
    rows = []
    for order, path in enumerate(paths):
      g = np.maximum(np.asarray(spectra[path][0], np.float64), 0)
      how = 'error' if self.sensitivity is not None else self.normalize
      g = _normalized(g, *spectra[path][1], how)
      if how == 'size':
        g = g * self._sizes[path]
      if self.sensitivity is not None:
        g = g * self.sensitivity[path]
      g = np.minimum.accumulate(g)
      for i, gain in enumerate(g):
        if gain > 0:
          rows.append((gain / self._costs[path], order, i))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    ranks = dict.fromkeys(paths, 0)
    left = self._left
    for _, order, i in rows:
      path = paths[order]
      cost = self._costs[path]
      if ranks[path] == i and cost <= left:
        ranks[path] += 1
        left -= cost
    self.spent_bits += self._left - left
    self.ranks = ranks
    return ranks


NORMALIZE = ('output', 'size', 'error', 'none', 'sqrt', 'log')


def _normalized(gains, out_energy, err_energy, how):
  """Gains on a scale shared by layers: a fraction of the layer's output
  energy ('output'), of its base's error ('error'), as they are ('none');
  or the drop each term gives in the relative error norm
  sqrt(left / out_energy) ('sqrt') or in log(left) ('log'), left being the
  error still unreconstructed."""
  if how in ('output', 'size'):  # 'size': times the weight's size, after
    return gains / max(out_energy, 1e-30)
  if how == 'error':
    return gains / max(err_energy, 1e-30)
  if how == 'none':
    return gains
  left = np.maximum(err_energy - np.concatenate([[0], np.cumsum(gains)]),
                    1e-9 * max(err_energy, 1e-30))
  if how == 'sqrt':
    root = np.sqrt(left / max(out_energy, 1e-30))
    return root[:-1] - root[1:]
  return np.log(left[:-1]) - np.log(left[1:])


def output_sensitivity(apply_fn, fp_params, ptq_params, batches, *,
                       probes=16, seed=0, output='gaussian') -> dict:
  """{path: ||J_w D_w||^2 / ||f||^2}: how far the model's output f moves,
  to first order, when only weight w takes its Qwix PTQ error D_w
  (`ptq_params`), J_w the Jacobian of f in W_w.

  Estimated for every weight at once (Hutchinson): for v ~ N(0, I) over
  the output, E_v[<v, J_w D_w>^2] = ||J_w D_w||^2 and <v, J_w D_w> =
  <J_w^T v, D_w>, so each of `probes` backward passes (one jitted forward
  per batch) gives a sample for all weights. Examples (the leading axis of
  every batch argument) move separate outputs, so each is probed on its
  own (per-example gradients, same multiplies): probes x examples samples,
  relative std ~ sqrt(2 / (probes * examples)).
  apply_fn(params, *batch) -> output pytree; fp_params a pure dict;
  batches a list of argument tuples, examples on axis 0.

  output='softmax': the output is one array of logits over its last axis,
  and each position's v = onehot(y) - p with y ~ p = softmax(f), so
  E[v vᵀ] = diag(p) - p pᵀ, the Fisher of the model's prediction: the
  value is then Dᵀ Jᵀ F J D / positions, twice the mean KL(p_fp ‖ p_w) per
  position to second order, the loss increase a perplexity measures.
  """
  if output not in ('gaussian', 'softmax'):
    raise ValueError(f"output={output!r}: use 'gaussian' (any output) or"
                     " 'softmax' (logits)")
  flat_fp = flax.traverse_util.flatten_dict(fp_params)
  flat_q = flax.traverse_util.flatten_dict(ptq_params)
  paths = [p for p, q in flat_q.items() if isinstance(q, ptq.WithAux)]
  deltas = [qarray.dequantize(flat_q[p].array).reshape(flat_fp[p].shape)
            .astype(jnp.float32) - flat_fp[p].astype(jnp.float32)
            for p in paths]

  def direction(k, x):
    if output == 'gaussian':
      return jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
    p = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
    y = jax.random.categorical(k, x.astype(jnp.float32), axis=-1)
    return (jax.nn.one_hot(y, x.shape[-1]) - p).astype(x.dtype)

  def example(params, weights, deltas, inputs, key):
    """One example's squared <J_w^T v, D_w> (gradients of the quantized
    weights only), mean over probes, and its output energy (or positions)."""
    def apply(weights):
      flat = flax.traverse_util.flatten_dict(params) | dict(
          zip(paths, weights))
      return apply_fn(flax.traverse_util.unflatten_dict(flat),
                      *(x[None] for x in inputs))
    out, pullback = jax.vjp(apply, weights)
    leaves, treedef = jax.tree.flatten(out)

    def one(k):
      vs = [direction(kk, x)
            for kk, x in zip(jax.random.split(k, len(leaves)), leaves)]
      grads = pullback(jax.tree.unflatten(treedef, vs))[0]
      return jnp.stack([jnp.vdot(g.astype(jnp.float32), d)
                        for g, d in zip(grads, deltas)])

    if output == 'softmax':
      energy = sum(x.size // x.shape[-1] for x in leaves)
    else:
      energy = sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                   for x in leaves)
    inner = jax.lax.map(one, jax.random.split(key, probes))
    return jnp.mean(jnp.square(inner), axis=0), energy

  @jax.jit
  def probe(params, weights, deltas, batch, key):
    keys = jax.random.split(key, len(batch[0]))
    moved, energy = jax.lax.map(  # vmapped 8 at a time
        lambda a: example(params, weights, deltas, *a), (batch, keys),
        batch_size=min(8, len(keys)))
    return jnp.sum(moved, axis=0), jnp.sum(energy)

  weights = [flat_fp[p] for p in paths]
  moved, energy = 0.0, 0.0
  for i, batch in enumerate(batches):
    m, e = probe(fp_params, weights, deltas, tuple(batch),
                 jax.random.fold_in(jax.random.key(seed), i))
    moved, energy = moved + np.asarray(m, np.float64), energy + float(e)
  return {p: float(v) / energy for p, v in zip(paths, moved)}
