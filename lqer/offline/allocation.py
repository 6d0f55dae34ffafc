"""Rank allocation under a budget of extra bits per weight (rank='auto').

A weight's rank-i term removes g_i = ||T A_i||^2 = sigma_i^2 from its
method's objective ||T (E - A B)||_F^2 (`decompose.component_energy`); on
the calibration distribution that is output error removed. To compare
layers, gains are put on one scale (`Budget`): by default, with
output-gradient statistics (`calibration.output_gradients`), each is the
output damage it removes (its gain weighted per output channel by the
output gradient's second moment), without them the fraction of its
layer's output energy ||T W||_F^2 it removes times the layer's size (the
report's size-weighted total); with a probe
(`lqer.offline.probe`), the output damage it undoes, measured on the weight's
own
factors (`_fitted_values`); with a measured `output_sensitivity`, the
output change (first order) from that weight's PTQ error alone times the
fraction of the weight's error the term removes. Each term costs the same
bits within a weight (`component_bits`), and values are made non-increasing
in i (`_decreasing`), so taking terms by value per bit, largest first, while
they fit is the greedy solution of this knapsack (optimal up to the last
term) and always takes a prefix of each weight's terms: its rank. Ties go
to the earlier weight (param order), so the allocation is deterministic.

Mixed precision, the equal-bits baseline of a budget (`lqer eval --budget`),
is the same greedy over bit widths instead of ranks: `error_damage` values
a weight's PTQ error at each width by the output-gradient statistics, and
`allocate_widths` spends the budget on the widths that remove the most
damage per bit.
"""

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer.core.paths import path_str
from lqer.offline.probe import OutputProbe
from lqer.quant import packing
from lqer.quant import stats as stats_lib
from lqer.quant.bits import component_bits
from lqer.quant.weight import layout_of


def fixed_bits(job) -> int:
  """Extra bits a job spends whatever the allocation: the factors of a
  fixed rank, and a per-input-channel scale (AWQ, SVDQuant) in float32."""
  bits = (
    0 if job.rule.auto_rank else job.rank * component_bits(job.layout, job.rule)
  )
  if job.svdquant and job.rule.error_rank:
    bits += job.rule.error_rank * component_bits(job.layout, job.rule)
  if job.svdquant or job.base_kind in ('awq', 'stored-awq'):
    bits += math.prod(job.layout.batch_shape) * job.layout.in_size * 32
  return bits


NORMALIZE = (None, 'gradient', 'output', 'size', 'error', 'none', 'sqrt', 'log')


@dataclasses.dataclass(frozen=True)
class Budget:
  """A budget of extra bits per weight, and how terms of weights compare.

  A plain value: `lqer_quantize_params(..., budget_bits=Budget(...),
  return_allocation=True)` returns what it decided as an `Allocation`, and
  the same Budget can be passed to any number of calls.

  How terms of different weights compare: by default, when the calibration
  statistics hold output gradients (`lqer.output_gradients`), 'gradient':
  the output damage each term removes, its gain weighted per output channel
  by E[g_o^2] (`damage_gains`); with `probe`, by the output damage each
  undoes, measured on the factors themselves (`_fitted_values`); with
  `sensitivity` (from `output_sensitivity`), by the damage of the weight's
  PTQ error times the fraction of its objective the term removes; else by
  `normalize` (`_normalized`), without output gradients 'size': the
  fraction of the layer's output energy removed times its size, so the
  greedy lowers the report's size-weighted total output error.

  Attributes:
    bits_per_weight: extra bits per weight, averaged over every element of
      every weight the call quantizes (finite, >= 0).
    normalize: one of `NORMALIZE` (None: 'gradient' where every weight has
      output-gradient statistics, else 'size').
    sensitivity: {path: output damage of that weight's PTQ error}.
    probe: an `OutputProbe`; the ranks kept are then the candidate (λ in
      `steps`: 1 the allocation, 0 the uniform rank) whose weights move the
      probed output least.
    steps: the probe's candidates.
  """

  bits_per_weight: float
  normalize: str | None = None
  sensitivity: dict | None = None
  probe: OutputProbe | None = None
  steps: tuple[float, ...] = (1.0, 0.5, 0.0)

  def __post_init__(self):
    bits = self.bits_per_weight
    if (
      isinstance(bits, bool)
      or not isinstance(bits, numbers.Real)
      or not math.isfinite(bits)
      or bits < 0
    ):
      raise ValueError(
        f'budget_bits must be a finite number >= 0 (extra bits per'
        f' weight), got {bits!r}'
      )
    if self.probe is not None and self.sensitivity is not None:
      raise ValueError(
        'Budget: give either probe (damage measured on the'
        ' factors) or sensitivity (of the PTQ error), not both'
      )
    if self.normalize not in NORMALIZE:
      raise ValueError(
        f'Budget.normalize must be one of {NORMALIZE}, got {self.normalize!r}'
      )


@dataclasses.dataclass
class Allocation:
  """What one allocation decided.

  Attributes:
    ranks: {path: rank} of every rank='auto' weight.
    values: {path: each term's value, in allocation order}.
    damage: with a probe, {path: (ranks, output damage at those ranks)}.
    chosen: with a probe, {λ: output distance of that candidate}.
    spent_bits: extra bits spent (fixed-rank factors and input scales
      included).
    num_weights: weight elements the budget is averaged over.
  """

  ranks: dict
  values: dict
  damage: dict
  chosen: dict
  spent_bits: int
  num_weights: int

  @property
  def extra_bits_per_weight(self) -> float:
    """spent_bits / num_weights."""
    return self.spent_bits / max(self.num_weights, 1)


class Allocator:
  """One call's allocation under a `Budget`: `lqer_quantize_params` makes
  one per call, drives it through the offline pass (`jobs.run_jobs`), and
  `result()` is the `Allocation`.

  Args:
    budget: the `Budget`.
    num_weights: weight elements the call quantizes.
    params: the float params a probe differentiates (None without one).
  """

  def __init__(self, budget: Budget, num_weights: int, params: Any = None):
    self.budget = budget
    self.num_weights = num_weights
    self.params = params if budget.probe is not None else None
    self.spent_bits = 0
    self.ranks, self.values, self.damage, self.chosen = {}, {}, {}, {}
    self._left = 0
    self._costs, self._sizes, self._max = {}, {}, {}
    self._uniform = 1

  @property
  def probe(self):
    return self.budget.probe

  def result(self) -> Allocation:
    """The allocation decided (the float params are dropped)."""
    self.params = None
    return Allocation(
      self.ranks,
      self.values,
      self.damage,
      self.chosen,
      self.spent_bits,
      self.num_weights,
    )

  def set_max_ranks(self, jobs):
    """Sets each 'auto' job's rank to the largest it may get: its rule's
    max_rank or twice the uniform rank that spends the budget (rounded up
    to 8), at most min(in, out)."""
    auto = [j for j in jobs if j.rule.auto_rank]
    if not auto:
      raise ValueError(
        'lqer_quantize_params: budget_bits is given but no weight has a'
        " rule with rank='auto'; set LqerRule(rank='auto') on the rules"
        ' whose ranks should be allocated'
      )
    fixed = sum(fixed_bits(j) for j in jobs)
    self._left = (
      math.floor(self.budget.bits_per_weight * self.num_weights) - fixed
    )
    if self._left < 0:
      raise ValueError(
        f'budget_bits={self.budget.bits_per_weight}: the fixed-rank factors and'
        f' input scales already spend {fixed / self.num_weights:.4f} extra'
        ' bits per weight; raise the budget or lower the fixed ranks'
      )
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
    damage = self.budget.probe.damage(
      self.params, {p: e for p, (_, e) in errors.items()}
    )
    self.damage = {p: (r, damage[p]) for p, (r, _) in errors.items()}

  def _valuation(self, spectra) -> str:
    """How `allocate` values terms: 'probe', 'error' (sensitivity), or the
    normalisation (None: 'gradient' where every weight has output-gradient
    statistics, else 'size')."""
    if self.budget.probe is not None:
      return 'probe'
    if self.budget.sensitivity is not None:
      return 'error'
    missing = [p for p, s in spectra.items() if s[2] is None]
    if self.budget.normalize == 'gradient' and missing:
      raise ValueError(
        f"Budget(normalize='gradient'): {path_str(missing[0])}"
        f' (and {len(missing) - 1} more) has no output-gradient statistics'
        ' (sum_of_g2); run lqer.providers.calibration.output_gradients over the'
        ' calibration statistics first'
      )
    if self.budget.normalize is None:
      return 'size' if missing else 'gradient'
    return self.budget.normalize

  def allocate(self, spectra: dict) -> dict:
    """{path: rank} from each 'auto' weight's (gains (k,), (||T W||^2,
    ||T E||^2), gradient-weighted gains (k,) or None)."""
    paths = list(spectra)
    rows = []
    how = self._valuation(spectra)
    self.values = {}
    for order, path in enumerate(paths):
      g = np.maximum(np.asarray(spectra[path][0], np.float64), 0)
      if path in self.damage:
        g = _fitted_values(g, spectra[path][1][1], *self.damage[path])
      elif how == 'gradient':
        g = np.maximum(np.asarray(spectra[path][2], np.float64), 0)
      else:
        g = _normalized(g, *spectra[path][1], how)
        if how == 'size':
          g = g * self._sizes[path]
        if self.budget.sensitivity is not None:
          g = g * self.budget.sensitivity[path]
      self.values[path] = g
      g = _decreasing(g)
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
    return [
      {
        p: math.floor(lam * r + (1 - lam) * min(uniform, self._max[p]))
        for p, r in ranks.items()
      }
      for lam in self.budget.steps
    ]

  def choose(self, ranks: dict, distances: list[float]):
    """Records the candidate kept (`chosen`: {λ: distance})."""
    self.spent_bits += sum(
      self._costs[p] * (r - self.ranks[p]) for p, r in ranks.items()
    )
    self.ranks = ranks
    self.chosen = dict(zip(self.budget.steps, distances))


def damage_gains(gains, b, stats):
  """Each term's gain weighted by the output gradient's second moment per
  output channel, g_i sum_o E[g_o^2] B_io^2 / ||B_i||^2 (B (*, k, out):
  the terms' output directions), or None without output-gradient
  statistics: the output damage, to first order, the term removes if the
  layer's input and the gradient are independent
  (`calibration.output_gradients`)."""
  if stats is None or 'sum_of_g2' not in stats:
    return None
  h = np.asarray(stats['sum_of_g2'], np.float64) / max(
    float(stats['grad_count']), 1.0
  )
  b = np.square(np.asarray(b, np.float64)).reshape(-1, *b.shape[-2:]).sum(0)
  return gains * (b @ h) / np.maximum(b.sum(-1), 1e-30)


def _decreasing(gains):
  """The closest non-increasing sequence (pooled adjacent violators): each
  run of terms whose gains rise is given their mean, so any rank's total
  at a run's end is kept and the greedy, taking prefixes, values a term
  after a small one at what the pair is worth together."""
  blocks = []  # [mean, count]
  for g in gains:
    blocks.append([float(g), 1])
    while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
      (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
      blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
  return (
    np.concatenate([np.full(n, m) for m, n in blocks])
    if blocks
    else (np.zeros(0))
  )


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
  left = np.maximum(
    1 - np.concatenate([[0], np.cumsum(gains)]) / max(err_energy, 1e-30), 1e-12
  )
  at = [i for i, r in enumerate(ranks) if i and left[r] > 1e-6]  # not full
  log_f = np.log(left[[ranks[i] for i in at]])
  log_d = np.log(
    np.maximum(np.asarray(damage, np.float64)[at], 1e-12 * d0) / d0
  )
  alpha = (
    float(np.clip(log_f @ log_d / (log_f @ log_f), 0.1, 10))
    if log_f @ log_f > 0
    else 1.0
  )
  curve = d0 * left**alpha
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
  left = np.maximum(
    err_energy - np.concatenate([[0], np.cumsum(gains)]),
    1e-9 * max(err_energy, 1e-30),
  )
  if how == 'sqrt':
    root = np.sqrt(left / max(out_energy, 1e-30))
    return root[:-1] - root[1:]
  return np.log(left[:-1]) - np.log(left[1:])


def error_damage(w, q, stats) -> float:
  """Output damage of a quantized weight's error, to first order.

  With D = deq(q) - W as an (in, out) matrix, R = E[x^T x] and h_o =
  E[g_o^2] the output gradient's second moment per output channel
  (`calibration.output_gradients`),

      damage = Σ_o h_o (D^T R D)_oo,

  the output change E||J D||^2 if the layer's input and the gradient are
  independent and the output channels' gradients uncorrelated (what
  `damage_gains` assumes of one factor term). Without gradient statistics
  h = 1 (the output error tr(D^T R D)); without E[x^T x], R = I.

  Args:
    w: the float kernel.
    q: its quantized weight (a Qwix `WithAux`; plain PTQ).
    stats: its calibration statistics (`lqer.quant.stats`) or None.
  """
  layout = layout_of(q)
  deq = qwix.dequantize(packing.as_qarray(q.array)).astype(jnp.float32)
  d = layout.to_matrix(deq.reshape(w.shape) - jnp.asarray(w, jnp.float32))
  d = d.reshape(-1, *d.shape[-2:])
  stats = stats or {}
  r = (
    stats_lib.second_moment(stats)
    if 'sum_of_xtx' in stats
    else jnp.eye(d.shape[-2])
  )
  h = (
    stats['sum_of_g2'] / jnp.maximum(stats['grad_count'], 1.0)
    if 'sum_of_g2' in stats
    else jnp.ones(d.shape[-1])
  )
  if r.shape != d.shape[-2:-1] * 2 or h.shape != d.shape[-1:]:
    r, h = jnp.eye(d.shape[-2]), jnp.ones(d.shape[-1])  # batch axes
  return float(_damage(d, r.astype(jnp.float32), h.astype(jnp.float32)))


@jax.jit
def _damage(d, r, h):
  """Σ_o h_o (D^T R D)_oo over stacked D (*, in, out)."""
  rd = jnp.einsum('ij,bjo->bio', r, d, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(rd * d * h)


@dataclasses.dataclass
class Widths:
  """What `allocate_widths` decided.

  Attributes:
    index: {path: index of the chosen option} (0: the base width).
    spent_bits: bits spent over the base widths.
    left_bits: budget bits left unspent (less than the cost of any step
      still open; none stays open once every weight has its widest).
  """

  index: dict
  spent_bits: int
  left_bits: int


def allocate_widths(options: dict, budget_bits: int) -> Widths:
  """Mixed precision under a budget: each weight's bit width, greedily.

  options {path: [(bits, damage), ...]}: each weight's stored bits and
  output damage (`error_damage`) at each width it may take, narrowest
  (its base) first. A step from one width to a wider one costs the bits
  between them and removes the damage between them; only the steps of the
  lower convex hull of (bits, damage) are offered, so each weight's steps
  remove less damage per bit the wider it goes, and taking steps by damage
  removed per bit, largest first, while they fit (a step only after the
  weight's earlier ones; skipped ones leave room for cheaper later ones) is
  the greedy of this knapsack, like the rank allocation's. Ties go to the
  earlier weight, so it is deterministic.

  Args:
    options: as above.
    budget_bits: bits to spend over the base widths (>= 0).

  Returns:
    `Widths`.
  """
  paths = list(options)
  hulls, steps = {}, []
  for order, path in enumerate(paths):
    hull = _lower_hull(options[path])
    hulls[path] = hull
    for i in range(1, len(hull)):
      (b0, d0), (b1, d1) = options[path][hull[i - 1]], options[path][hull[i]]
      steps.append(((d0 - d1) / max(b1 - b0, 1e-30), order, i))
  steps.sort(key=lambda s: (-s[0], s[1], s[2]))
  at = dict.fromkeys(paths, 0)
  left = int(budget_bits)
  for value, order, i in steps:
    path = paths[order]
    hull = hulls[path]
    cost = options[path][hull[i]][0] - options[path][hull[i - 1]][0]
    if value > 0 and at[path] == i - 1 and cost <= left:
      at[path] = i
      left -= cost
  return Widths(
    {p: hulls[p][at[p]] for p in paths}, int(budget_bits) - left, left
  )


def _lower_hull(points) -> list[int]:
  """Indices of the lower convex hull of (bits, damage) from the first
  point, bits increasing, damage decreasing (points above it, or no
  cheaper in damage than a narrower point, are dropped)."""
  hull = [0]
  for i in range(1, len(points)):
    if (
      points[i][1] >= points[hull[-1]][1] or points[i][0] <= points[hull[-1]][0]
    ):
      continue
    while len(hull) > 1:
      (b0, d0), (b1, d1) = points[hull[-2]], points[hull[-1]]
      b2, d2 = points[i]
      # Drop the middle point when it lies on or above the chord.
      if (d1 - d0) * (b2 - b0) >= (d2 - d0) * (b1 - b0):
        hull.pop()
      else:
        break
    hull.append(i)
  return hull
