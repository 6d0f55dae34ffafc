"""`LqerCalibrationProvider`: records the input statistics of matched ops.

Usage (Linen):

    cal_model = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
    stats = lqer.calibrate(cal_model, params, [(x,) for x in batches])

For every weight that an `LqerRule` with a `weight_qtype` matches, the sums of
|x| and x^T x and the max of |x| over all tokens of that op's input are
accumulated (see `lqer.quant.stats`), contracting axes flattened in the kernel's
axis order, so multi-axis DenseGeneral / Einsum kernels are covered.
Kernels with einsum batch axes get no statistics (their slices see different
inputs) and `lqer_quantize_params` says so if a method needs them. Under a
rule with `rotate`, the statistics are those of the rotated input x H (the
input the quantized weight Hᵀ W multiplies), each exact, and record the
rotation's signs (`lqer.offline.params.ROTATION_KEY`).

Output gradients (for rank allocation, `lqer.Budget`): a model under
`LqerCalibrationProvider(rules, output_gradients=True)` taps the output of
every matched op, and `output_gradients` adds to the statistics, per
output channel o, sum_t g_{t,o}^2 of the output's cotangent g = J^T v for
random directions v over the model output (Fisher directions for logits).

    grad_model = qwix.quantize_model(
        model, lqer.LqerCalibrationProvider(rules, output_gradients=True))
    stats = lqer.output_gradients(grad_model, params, batches,
                                              stats, output='softmax')
"""

import functools
import math

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import qwix
from tqdm.auto import tqdm

from lqer import _qwix
from lqer.core import rotation as rotation_lib
from lqer.core.paths import path_str
from lqer.offline import probe as probe_lib
from lqer.offline.params import ROTATION_KEY
from lqer.quant import stats as stats_lib
from lqer.quant.rule import LqerRule

GRAD_SUFFIX = stats_lib.SUFFIX + '_grad'


class LqerCalibrationProvider(qwix.QuantizationProvider):
  """Runs the float model and accumulates exact per-token statistics.

  For every weight an `LqerRule` with a `weight_qtype` matches: sum |x|,
  sum x^T x and max |x| over the tokens of the op's input (`lqer.quant.stats`).
  How many tokens: E[x^T x] of an `in`-wide input has in (in + 1) / 2
  distinct entries; a few times `in` tokens (e.g. 4k-32k for in <= 4096) give
  a well-conditioned estimate, and damping covers the rest.

  Args:
    rules: the `LqerRule`s of the quantized model.
    second_moment: accumulate x^T x (needed by 'qera' and GPTQ); False keeps
      only the per-channel statistics ('l2qer', 'svdquant', AWQ).
    sample_tokens: tokens kept per op for the report's bound terms.
    output_gradients: also tap each matched op's output, for
      `lqer.output_gradients`.
    **kwargs: `qwix.QuantizationProvider`'s.
  """

  def __init__(
    self,
    rules,
    *,
    second_moment: bool = True,
    sample_tokens: int = 256,
    output_gradients: bool = False,
    **kwargs,
  ):
    """second_moment=False keeps only mean and max |x| (enough for 'l2qer'
    and for smoothing); rules with an act_qtype also keep `sample_tokens`
    tokens, for the report's activation-error terms (0: none).
    output_gradients=True: no input statistics; each matched op's output
    is tapped for `output_gradients` instead."""
    super().__init__(rules, **kwargs)
    self._second_moment = second_moment
    self._sample_tokens = sample_tokens
    self._output_gradients = output_gradients

  def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
    return self._collect('dot_general', lhs, rhs, dimension_numbers, out)

  def einsum(self, einsum_str, *operands, **kwargs):
    out = jnp.einsum(einsum_str, *operands, **kwargs)
    if isinstance(einsum_str, str) and len(operands) == 2:
      lhs, rhs = operands
      info = _qwix.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim))
      # The output's axes as dot_general orders them: the lhs's free axes,
      # then the kernel's output axes in the kernel's order.
      order = ''.join(
        [c for c in info.out if c not in info.rhs]
        + [c for c in info.rhs if c in info.out]
      )
      return self._collect(
        'einsum', lhs, rhs, info.dimension_numbers, out, (info.out, order)
      )
    return out

  def _collect(self, op_name, lhs, rhs, dimension_numbers, out, axes=None):
    """Records the op's input statistics (or taps its output) and returns
    the output. axes: an einsum's (output subscripts, dot_general order)."""
    rule = _qwix.current_rule(self, op_name)
    if not isinstance(rule, LqerRule) or rule.weight_qtype is None:
      return out
    name = _qwix.find_param(rhs)
    (lhs_ca, rhs_ca), (lhs_ba, _) = dimension_numbers
    if name is None or lhs_ba:
      return out
    if self._output_gradients:
      n_out = rhs.size // math.prod(rhs.shape[a] for a in rhs_ca)
      handle = _qwix.get_or_create_variable(
        'quant_stats',
        name + GRAD_SUFFIX,
        lambda: {
          'sum_of_g2': jnp.zeros((n_out,), jnp.float32),
          'grad_count': jnp.zeros((), jnp.float32),
        },
      )
      return _tap(out, handle.value, n_out, axes)
    x = tokens_by_kernel_order(lhs, lhs_ca, rhs_ca)
    signs = rule.rotation_signs(
      x.shape[1], path_str((*_qwix.get_current_module_path(), name))
    )
    marker = {}
    if signs is not None:  # the input the rotated weight multiplies
      x = rotation_lib.rotate(x, signs, -1)
      marker = {ROTATION_KEY: jnp.asarray(signs)}
    sums = stats_lib.batch_sums(
      x,
      self._second_moment,
      self._sample_tokens if rule.act_qtype is not None else 0,
    )
    var = _qwix.get_or_create_variable(
      'quant_stats',
      name + stats_lib.SUFFIX,
      lambda: jax.tree.map(jnp.zeros_like, sums) | marker,
    )
    if _qwix.should_update_quant_stats():
      total = {k: v for k, v in var.value.items() if k != ROTATION_KEY}
      var.value = stats_lib.accumulate(total, sums) | marker
    return out

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


def calibrate(
  cal_model, params, batches, *, outputs: bool = False, progress: bool = False
):
  """Calibration statistics of a model over batches.

  One jitted step per call, params passed as an argument: closed over, a
  7B-shaped block's 0.8 GB of weights would become compile-time constants.
  Without `outputs` the step returns none, so work that only the output
  needs (e.g. the last projection) is dropped by XLA.

  Args:
    cal_model: a model under `LqerCalibrationProvider`: Linen, or NNX (made
      by `qwix.quantize_model(model, provider, *example_inputs)`).
    params: Linen: its float params; NNX: None (the model holds them).
    batches: a non-empty list of tuples of model inputs.
    outputs: also return the model outputs.
    progress: show a progress bar.

  Returns:
    The `quant_stats` tree (NNX: its pure dict, as
    `nnx.to_pure_dict(nnx.state(model, qwix.QuantStat))` gives), accumulated
    from zeros; with `outputs`, the tree and the list of model outputs.
  """
  batches = _checked_batches(batches)
  if isinstance(cal_model, nnx.Module):
    if params is not None:
      raise TypeError(
        'calibrate: an NNX model holds its params; pass params=None'
      )
    graphdef, stats, params = nnx.split(cal_model, qwix.QuantStat, ...)

    def apply(params, stats, batch):
      model = nnx.merge(graphdef, stats, params)
      y = model(*batch)
      return nnx.state(model, qwix.QuantStat), y

  else:
    stats = jax.eval_shape(cal_model.init, jax.random.key(0), *batches[0])[
      'quant_stats'
    ]

    def apply(params, stats, batch):
      y, new = cal_model.apply(
        {'params': params, 'quant_stats': stats}, *batch, mutable='quant_stats'
      )
      return new['quant_stats'], y

  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats)

  @jax.jit
  def step(params, stats, batch):
    stats, y = apply(params, stats, batch)
    return stats, (y if outputs else None)

  ys = []
  for batch in tqdm(
    batches, desc='calibration', leave=False, disable=not progress
  ):
    stats, y = step(params, stats, batch)
    ys.append(y)
  # Done here, not in whatever first reads the statistics (a quantize step
  # timed after this would otherwise include the calibration's compute).
  stats = jax.block_until_ready(stats)
  if isinstance(stats, nnx.State):
    stats = nnx.to_pure_dict(stats)
  return (stats, ys) if outputs else stats


def _checked_batches(batches) -> list:
  """`batches` as a list of tuples, refused when empty or holding an input
  with no elements (no tokens: nothing to calibrate on)."""
  batches = [tuple(b) for b in batches]
  if not batches:
    raise ValueError(
      'calibrate: no batches; give a list of tuples of model inputs, e.g.'
      ' [(x1,), (x2,)]'
    )
  for i, batch in enumerate(batches):
    sizes = [jnp.size(x) for x in jax.tree.leaves(batch)]
    if not sizes or not all(sizes):
      raise ValueError(
        f'calibrate: batch {i} has an input with no elements (shapes'
        f' {[jnp.shape(x) for x in jax.tree.leaves(batch)]}); every batch'
        ' needs at least one token'
      )
  return batches


def output_gradients(
  grad_model,
  params,
  batches,
  stats,
  *,
  output='gaussian',
  seed=0,
  progress=False,
):
  """Adds output-gradient statistics to calibration statistics.

  For every op `grad_model` taps, 'sum_of_g2' (out,) = sum_t g_{t,o}^2 and
  'grad_count' (tokens) join its weight's statistics: g = J^T v is the
  cotangent at the op's output for one random direction v over the model
  output per batch, so E[g_o^2] is output channel o's share of E||J D||^2
  (the output change of an error D at that op). One jitted forward and
  backward per batch.

  Args:
    grad_model: a model under `LqerCalibrationProvider(rules,
      output_gradients=True)`.
    params: Linen: the float params; NNX: None (grad_model holds them).
    batches: a list of tuples of model inputs.
    stats: the statistics from `lqer.calibrate` (or the NNX flow).
    output: 'gaussian' (any output) or 'softmax' (logits: Fisher directions,
      v = onehot(y) - p with y ~ p).
    seed: the directions' seed.
    progress: show a progress bar.

  Returns:
    `stats` with the gradient statistics added.
  """
  if isinstance(grad_model, nnx.Module):  # its taps exist once it has run
    graphdef, handles, rest = nnx.split(grad_model, qwix.QuantStat, ...)
    apply = lambda params, h, batch: nnx.merge(graphdef, h, params)(*batch)
    params = rest
  else:
    handles = jax.eval_shape(
      grad_model.init, jax.random.key(0), *batches[0]
    ).get('quant_stats', {})
    apply = lambda params, h, batch: grad_model.apply(
      {'params': params, 'quant_stats': h}, *batch
    )
  flat_taps = lambda tree: flax.traverse_util.flatten_dict(
    nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
  )
  if not any(str(p[-2]).endswith(GRAD_SUFFIX) for p in flat_taps(handles)):
    raise ValueError(
      'output_gradients: the model taps no op; quantize it with'
      ' LqerCalibrationProvider(rules, output_gradients=True), with rules'
      ' that match its weights (NNX: qwix.quantize_model(model, provider,'
      ' *example_inputs))'
    )
  handles = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), handles)

  @jax.jit
  def step(params, handles, batch, key):
    out, pullback = jax.vjp(lambda h: apply(params, h, batch), handles)
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(key, len(leaves))
    return pullback(
      jax.tree.unflatten(
        treedef,
        [probe_lib.direction(output, k, x) for k, x in zip(keys, leaves)],
      )
    )[0]

  total = handles
  for i, batch in enumerate(
    tqdm(batches, desc='output gradients', leave=False, disable=not progress)
  ):
    grads = step(
      params, handles, tuple(batch), jax.random.fold_in(jax.random.key(seed), i)
    )
    total = jax.tree.map(jnp.add, total, grads)
  flat = flax.traverse_util.flatten_dict(stats)
  for path, value in flat_taps(total).items():
    if not path[-2].endswith(GRAD_SUFFIX):
      continue
    weight = path[:-2] + (path[-2][: -len(GRAD_SUFFIX)] + stats_lib.SUFFIX,)
    if weight + ('count',) not in flat:
      raise ValueError(
        f'output_gradients: {path_str(weight)} has'
        ' no input statistics in `stats`; calibrate with the'
        ' same rules first (calibration.calibrate)'
      )
    flat[weight + (path[-1],)] = jax.block_until_ready(value)
  return flax.traverse_util.unflatten_dict(flat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap(out, handle, n_out, axes):
  """out, unchanged. Its backward pass passes the cotangent g on and gives
  `handle` the cotangent {'sum_of_g2': sum_t g_t^2 per output channel (the
  kernel's n_out, in its axis order), 'grad_count': tokens}. axes: None for
  dot_general, else the einsum's (output subscripts, dot_general order)."""
  del handle, n_out, axes
  return out


def _tap_fwd(out, handle, n_out, axes):
  del handle, n_out, axes
  return out, None


def _tap_bwd(n_out, axes, _, g):
  h = g if axes is None else jnp.einsum(f'{axes[0]}->{axes[1]}', g)
  h = h.astype(jnp.float32).reshape(-1, n_out)
  return g, {
    'sum_of_g2': jnp.sum(jnp.square(h), axis=0),
    'grad_count': jnp.asarray(h.shape[0], jnp.float32),
  }


_tap.defvjp(_tap_fwd, _tap_bwd)
