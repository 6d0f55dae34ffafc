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
import functools
import math
from typing import Any, Callable, Sequence

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

  How terms of different weights compare: with `probe`, by the model output
  damage each undoes, measured on the factors themselves (`measure`,
  `_fitted_values`); with `sensitivity` (from `output_sensitivity`), by the
  damage of the weight's PTQ error times the fraction of its objective the
  term removes; else by `normalize` (`_normalized`), default 'size': the
  fraction of the layer's output energy removed times its size, so the
  greedy lowers the report's size-weighted total output error.
  `params`: the float params the probe differentiates (set by
  lqer_quantize_params); `damage`: {path: (ranks, damage at those ranks)}.
  """

  bits_per_weight: float
  num_weights: int = 0
  normalize: str = 'size'
  sensitivity: dict | None = None
  probe: 'OutputProbe | None' = None
  params: Any = dataclasses.field(default=None, repr=False)
  spent_bits: int = 0
  ranks: dict = dataclasses.field(default_factory=dict)
  damage: dict = dataclasses.field(default_factory=dict)
  steps: tuple[float, ...] = (1.0, 0.5, 0.0)
  chosen: dict = dataclasses.field(default_factory=dict)
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
    self._max = {j.path: j.rank for j in auto}
    self._uniform = max(1, round(uniform))
    self.spent_bits = fixed

  def probe_ranks(self, job) -> list[int]:
    """Ranks at which `measure` probes a weight's damage: 0, the uniform
    rank that spends the budget, and its largest."""
    return sorted({0, min(self._uniform, job.rank), job.rank})

  def measure(self, errors: dict):
    """Probes the damage of each weight's error left at its
    `probe_ranks`: errors {path: (ranks, (K, *W.shape) W - Q - A_:r B_:r)}."""
    damage = self.probe.damage(self.params, {p: e for p, (_, e) in
                                             errors.items()})
    self.damage = {p: (r, damage[p]) for p, (r, _) in errors.items()}

  def allocate(self, spectra: dict) -> dict:
    """{path: rank} from each 'auto' weight's (gains (k,), (||T W||^2,
    ||T E||^2))."""
    paths = list(spectra)
    rows = []
    for order, path in enumerate(paths):
      g = np.maximum(np.asarray(spectra[path][0], np.float64), 0)
      if path in self.damage:
        g = _fitted_values(g, spectra[path][1][1], *self.damage[path])
      else:
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

  def candidates(self, ranks: dict) -> list[dict]:
    """The allocated ranks, then ranks between them and the uniform rank
    that fits the budget, floor(λ allocated + (1 - λ) uniform) for λ in
    `steps`: each spends at most the budget (bits are linear in ranks)."""
    uniform = self._left // sum(self._costs.values())
    return [{p: math.floor(lam * r + (1 - lam) * min(uniform, self._max[p]))
             for p, r in ranks.items()} for lam in self.steps]

  def choose(self, ranks: dict, distances: list[float]):
    """Records the candidate kept (`chosen`: {λ: distance})."""
    self.spent_bits += sum(self._costs[p] * (r - self.ranks[p])
                           for p, r in ranks.items())
    self.ranks = ranks
    self.chosen = dict(zip(self.steps, distances))


NORMALIZE = ('output', 'size', 'error', 'none', 'sqrt', 'log')


def _fitted_values(gains, err_energy, ranks, damage):
  """Each term's output damage removed, D(0) (F(i)^α - F(i+1)^α), from the
  damage D(r) measured at `ranks` (0 first): F(r) = 1 - Σ_{i<r} g_i / ||T E||^2
  is the fraction of the objective left at rank r, and α (least squares
  of log D(r) / D(0) = α log F(r), over ranks that leave error: at full
  rank both vanish) how fast the damage falls with it. α = 1 would say a
  term removes the same fraction of each."""
  d0 = float(damage[0])
  if not d0 > 0:
    return np.zeros_like(gains)
  left = np.maximum(1 - np.concatenate([[0], np.cumsum(gains)]) /
                    max(err_energy, 1e-30), 1e-12)
  at = [i for i, r in enumerate(ranks) if i and left[r] > 1e-6]  # not full
  log_f = np.log(left[[ranks[i] for i in at]])
  log_d = np.log(np.maximum(np.asarray(damage, np.float64)[at], 1e-12 * d0)
                 / d0)
  alpha = (float(np.clip(log_f @ log_d / (log_f @ log_f), 0.1, 10))
           if log_f @ log_f > 0 else 1.0)
  curve = d0 * left ** alpha
  return curve[:-1] - curve[1:]


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
  (`ptq_params`), J_w the Jacobian of f in W_w (`output_damage`).
  apply_fn(params, *batch) -> output pytree; fp_params a pure dict;
  batches a list of argument tuples, examples on axis 0.
  """
  flat_fp = flax.traverse_util.flatten_dict(fp_params)
  flat_q = flax.traverse_util.flatten_dict(ptq_params)
  deltas = {p: (qarray.dequantize(q.array).reshape(flat_fp[p].shape)
                .astype(jnp.float32) - flat_fp[p].astype(jnp.float32))[None]
            for p, q in flat_q.items() if isinstance(q, ptq.WithAux)}
  damage = OutputProbe(apply_fn, batches, probes, seed, output).damage(
      fp_params, deltas)
  return {p: float(v[0]) for p, v in damage.items()}


@dataclasses.dataclass(frozen=True)
class OutputProbe:
  """How `output_damage` probes a model: apply_fn(params, *batch) -> output
  pytree, `batches` a list of argument tuples (examples on axis 0), the
  number of random directions per example, their seed, and 'gaussian'
  (any output) or 'softmax' (logits: Fisher directions)."""

  apply_fn: Callable[..., Any]
  batches: Sequence[Any]
  probes: int = 16
  seed: int = 0
  output: str = 'gaussian'

  def __post_init__(self):
    if self.output not in ('gaussian', 'softmax'):
      raise ValueError(f"output={self.output!r}: use 'gaussian' (any output)"
                       " or 'softmax' (logits)")

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
      d, n = _divergence(self.output,
                         _apply(self.apply_fn, fp_params, tuple(batch)),
                         _apply(self.apply_fn, moved, tuple(batch)))
      total, norm = total + float(d), norm + float(n)
    return total / norm


def output_damage(probe: OutputProbe, fp_params, deltas) -> dict:
  """{path: (K,) ||J_w D_k||^2 / ||f||^2 for each of the K perturbations
  D_k of weight w}: the model output's first-order change when only w
  moves by D_k, J_w the Jacobian of the output f in W_w.

  Estimated for every weight and perturbation at once (Hutchinson): for
  v ~ N(0, I) over the output, E_v[<v, J_w D>^2] = ||J_w D||^2 and
  <v, J_w D> = <J_w^T v, D>, so each of `probe.probes` backward passes
  (one jitted forward per batch) gives a sample for all of them. Examples
  (the leading axis of every batch argument) move separate outputs, so each
  is probed on its own (per-example gradients, same multiplies):
  probes x examples samples, relative std ~ sqrt(2 / (probes * examples)).

  output='softmax': the output is one array of logits over its last axis,
  and each position's v = onehot(y) - p with y ~ p = softmax(f), so
  E[v vᵀ] = diag(p) - p pᵀ, the Fisher of the model's prediction: the
  value is then Dᵀ Jᵀ F J D / positions, twice the mean KL(p_fp ‖ p_w) per
  position to second order, the loss increase a perplexity measures.
  """
  flat_fp = flax.traverse_util.flatten_dict(fp_params)
  paths = list(deltas)
  for p in paths:
    if p not in flat_fp or deltas[p].shape[1:] != flat_fp[p].shape:
      raise ValueError(
          f'output_damage: {"/".join(map(str, p))} has perturbations of shape'
          f' {deltas[p].shape[1:]}, but the params hold'
          f' {getattr(flat_fp.get(p), "shape", "no such weight")}')

  def direction(k, x):
    if probe.output == 'gaussian':
      return jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
    p = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
    y = jax.random.categorical(k, x.astype(jnp.float32), axis=-1)
    return (jax.nn.one_hot(y, x.shape[-1]) - p).astype(x.dtype)

  def example(params, weights, deltas, inputs, key):
    """One example's squared <J_w^T v, D_k> (gradients of the probed
    weights only), mean over probes, and its output energy (or positions)."""
    def apply(weights):
      flat = flax.traverse_util.flatten_dict(params) | dict(
          zip(paths, weights))
      return probe.apply_fn(flax.traverse_util.unflatten_dict(flat),
                            *(x[None] for x in inputs))
    out, pullback = jax.vjp(apply, weights)
    leaves, treedef = jax.tree.flatten(out)

    def one(k):
      vs = [direction(kk, x)
            for kk, x in zip(jax.random.split(k, len(leaves)), leaves)]
      grads = pullback(jax.tree.unflatten(treedef, vs))[0]
      return [jnp.tensordot(d, g.astype(jnp.float32), g.ndim)
              for g, d in zip(grads, deltas)]

    if probe.output == 'softmax':
      energy = sum(x.size // x.shape[-1] for x in leaves)
    else:
      energy = sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                   for x in leaves)
    inner = jax.lax.map(one, jax.random.split(key, probe.probes))
    return [jnp.mean(jnp.square(x), axis=0) for x in inner], energy

  @jax.jit
  def run(params, weights, deltas, batch, key):
    keys = jax.random.split(key, len(batch[0]))
    moved, energy = jax.lax.map(  # vmapped 8 at a time
        lambda a: example(params, weights, deltas, *a), (batch, keys),
        batch_size=min(8, len(keys)))
    return [jnp.sum(m, axis=0) for m in moved], jnp.sum(energy)

  weights = [flat_fp[p] for p in paths]
  stacked = [deltas[p].astype(jnp.float32) for p in paths]
  moved, energy = [0.0] * len(paths), 0.0
  for i, batch in enumerate(probe.batches):
    m, e = run(fp_params, weights, stacked, tuple(batch),
               jax.random.fold_in(jax.random.key(probe.seed), i))
    moved = [a + np.asarray(b, np.float64) for a, b in zip(moved, m)]
    energy += float(e)
  return {p: v / energy for p, v in zip(paths, moved)}



@functools.partial(jax.jit, static_argnums=0)
def _apply(apply_fn, params, batch):
  return jax.tree.leaves(apply_fn(params, *batch))


@functools.partial(jax.jit, static_argnums=0)
def _divergence(output, fp_out, out):
  """(summed divergence, normaliser) of one batch's outputs: KL(p_fp ‖ p)
  and positions ('softmax'), or ||f - f_fp||^2 and ||f_fp||^2."""
  pairs = [(f.astype(jnp.float32), g.astype(jnp.float32))
           for f, g in zip(fp_out, out)]
  if output == 'softmax':
    return (sum(jnp.sum(jax.nn.softmax(f) * (
        jax.nn.log_softmax(f) - jax.nn.log_softmax(g))) for f, g in pairs),
            sum(f.size // f.shape[-1] for f, _ in pairs))
  return (sum(jnp.sum(jnp.square(g - f)) for f, g in pairs),
          sum(jnp.sum(jnp.square(f)) for f, _ in pairs))
