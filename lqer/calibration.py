"""`LqerCalibrationProvider`: records the input statistics of matched ops.

Usage (Linen):

    cal_model = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
    stats = lqer.calibration.run(cal_model, params, [(x,) for x in batches])

For every weight that an `LqerRule` with a `weight_qtype` matches, the sums of
|x| and x^T x and the max of |x| over all tokens of that op's input are
accumulated (see `lqer.stats`), contracting axes flattened in the kernel's
axis order, so multi-axis DenseGeneral / Einsum kernels are covered. Kernels with einsum
batch axes get no statistics (their slices see different inputs) and
`lqer_quantize_params` says so if a method needs them.
"""

import jax
import jax.numpy as jnp
import qwix
from tqdm.auto import tqdm
from qwix._src.core import einsum_info
from qwix._src.utils import flax_util

from lqer import stats as stats_lib
from lqer.rule import LqerRule


class LqerCalibrationProvider(qwix.QuantizationProvider):
  """Runs the float model and accumulates exact per-token statistics.

  How many tokens: E[x^T x] of an `in`-wide input has in (in + 1) / 2
  distinct entries; a few times `in` tokens (e.g. 4k-32k for in <= 4096) give
  a well-conditioned estimate, and damping covers the rest.
  """

  def __init__(self, rules, *, second_moment: bool = True,
               sample_tokens: int = 256, **kwargs):
    """second_moment=False keeps only mean and max |x| (enough for 'l2qer'
    and for smoothing); rules with an act_qtype also keep `sample_tokens`
    tokens, for the report's activation-error terms (0: none)."""
    super().__init__(rules, **kwargs)
    self._second_moment = second_moment
    self._sample_tokens = sample_tokens

  def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
    self._collect('dot_general', lhs, rhs, dimension_numbers)
    return out

  def einsum(self, einsum_str, *operands, **kwargs):
    out = jnp.einsum(einsum_str, *operands, **kwargs)
    if isinstance(einsum_str, str) and len(operands) == 2:
      lhs, rhs = operands
      info = einsum_info.EinsumInfo.parse(einsum_str,
                                          ndims=(lhs.ndim, rhs.ndim))
      self._collect('einsum', lhs, rhs, info.dimension_numbers)
    return out

  def _collect(self, op_name, lhs, rhs, dimension_numbers):
    rule, _ = self._get_current_rule_and_op_id(op_name, only_rule=True)
    if not isinstance(rule, LqerRule) or rule.weight_qtype is None:
      return
    name = flax_util.find_param(rhs)
    (lhs_ca, rhs_ca), (lhs_ba, _) = dimension_numbers
    if name is None or lhs_ba:
      return
    x = tokens_by_kernel_order(lhs, lhs_ca, rhs_ca)
    sums = stats_lib.batch_sums(
        x, self._second_moment,
        self._sample_tokens if rule.act_qtype is not None else 0)
    var = flax_util.get_or_create_variable(
        'quant_stats', name + stats_lib.SUFFIX,
        lambda: jax.tree.map(jnp.zeros_like, sums))
    if flax_util.should_update_quant_stats():
      var.value = stats_lib.accumulate(var.value, sums)

  def get_intercept_map(self):
    return super().get_intercept_map() | {
        'jax.lax.dot_general': self.dot_general,
        'jax.numpy.einsum': self.einsum,
    }


def tokens_by_kernel_order(lhs, lhs_contracting, rhs_contracting):
  """lhs -> (tokens, in), contracting axes in the kernel's axis order."""
  pairs = sorted(zip(rhs_contracting, lhs_contracting))
  contracting = [lhs_axis for _, lhs_axis in pairs]
  free = [a for a in range(lhs.ndim) if a not in lhs_contracting]
  x = jnp.transpose(lhs, free + contracting)
  n_in = 1
  for a in contracting:
    n_in *= lhs.shape[a]
  return x.reshape(-1, n_in)


def run(cal_model, params, batches, *, outputs: bool = False,
        progress: bool = False):
  """The `quant_stats` of `cal_model` (a Linen model under
  LqerCalibrationProvider) over `batches` (each a tuple of model inputs),
  accumulated from zeros; with `outputs`, also the list of model outputs.

  One jitted step per call, params passed as an argument: closed over, a
  7B-shaped block's 0.8 GB of weights become compile-time constants (README,
  "Calibration statistics"). Without `outputs` the step returns none, so
  work that only the output needs (e.g. the last projection) is dropped by
  XLA.
  """
  stats = jax.eval_shape(cal_model.init, jax.random.key(0),
                         *batches[0])['quant_stats']
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats)

  @jax.jit
  def step(params, stats, batch):
    y, new = cal_model.apply({'params': params, 'quant_stats': stats},
                             *batch, mutable='quant_stats')
    return new['quant_stats'], (y if outputs else None)

  ys = []
  for batch in tqdm(batches, desc='calibration', leave=False,
                    disable=not progress):
    stats, y = step(params, stats, batch)
    ys.append(y)
  # Done here, not in whatever first reads the statistics (a quantize step
  # timed after this would otherwise include the calibration's compute).
  stats = jax.block_until_ready(stats)
  return (stats, ys) if outputs else stats
