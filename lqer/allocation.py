"""Rank allocation under a budget of extra bits per weight (rank='auto').

A weight's rank-i term removes g_i = ||T A_i||^2 = sigma_i^2 from its
method's objective ||T (E - A B)||_F^2 (`decompose.component_energy`); on
the calibration distribution that is output error removed. To compare
layers, each gain is divided by the weight's output energy ||T W||_F^2, so
a gain is a fraction of that layer's output. Each term costs the same bits
within a weight (`component_bits`), and gains decrease with i, so taking
terms by gain per bit, largest first, while they fit is the greedy solution
of this knapsack (optimal up to the last term) and always takes a prefix of
each weight's terms: its rank. Ties go to the earlier weight (param order),
so the allocation is deterministic.
"""

import dataclasses
import math

import numpy as np



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
  element of every weight the call quantizes)."""

  bits_per_weight: float
  num_weights: int
  spent_bits: int = 0
  ranks: dict = dataclasses.field(default_factory=dict)
  _left: int = 0
  _costs: dict = dataclasses.field(default_factory=dict)

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
    uniform = self._left / sum(self._costs.values())
    default = max(8, 8 * math.ceil(2 * uniform / 8))
    for job in auto:
      job.rank = min(job.layout.max_rank, job.rule.max_rank or default)
    self.spent_bits = fixed

  def allocate(self, gains: dict) -> dict:
    """{path: rank} from each 'auto' weight's normalized gains (k,)."""
    paths = list(gains)
    rows = []
    for order, path in enumerate(paths):
      g = np.minimum.accumulate(np.asarray(gains[path], np.float64))
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
