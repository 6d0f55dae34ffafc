"""Calibration statistics of one op's input: exact token means.

Stored in the `quant_stats` collection under `<weight name>_lqer` as sums and
a token count, the format of Qwix's `SimpleMovingAverage` (so its
`get_calibration` gives the same means):

    count        number of tokens seen (int32)
    sum_of_abs   sum_t |x_t|        (in,)
    sum_of_xtx   sum_t x_t^T x_t    (in, in)

Dividing by the token count, not the number of batches, makes the mean exact
when batches differ in size. Memory: sum_of_xtx is 4 in^2 bytes in float32,
e.g. 485 MB for in = 11008.
"""

import jax
import jax.numpy as jnp
from qwix._src.utils import flax_util

SUFFIX = '_lqer'


def batch_sums(x: jax.Array, with_second_moment: bool = True):
  """Sums over tokens of x (tokens, in): count, sum |x|, sum x^T x."""
  x = x.astype(jnp.float32)
  sums = {'count': jnp.asarray(x.shape[0], jnp.int32),
          'sum_of_abs': jnp.sum(jnp.abs(x), axis=0)}
  if with_second_moment:
    sums['sum_of_xtx'] = jnp.matmul(
        x.T, x, precision=jax.lax.Precision.HIGHEST)
  return sums


def accumulate(total, batch):
  """Adds the sums of one batch to the running sums."""
  if total.keys() != batch.keys():
    raise ValueError(f'statistics keys differ: {sorted(total)} vs'
                     f' {sorted(batch)}')
  return jax.tree.map(jnp.add, total, batch)


def lookup(calibration, path):
  """The stats of the weight at `path` in a quant_stats tree, or None."""
  if calibration is None:
    return None
  stats = flax_util.get_value_from_path(
      calibration, (*path[:-1], str(path[-1]) + SUFFIX))
  return flax_util.unbox(stats) if stats is not None else None


def check(stats, layout, name):
  """Raises ValueError if stats are empty or do not fit the kernel layout."""
  count = int(stats['count'])
  if count <= 0:
    raise ValueError(f'{name}: calibration statistics saw no tokens')
  if layout.batch_axes:
    raise ValueError(
        f'{name}: activation-aware reconstruction of a kernel with batch axes'
        f' {layout.batch_axes} is not supported (each batch slice sees its own'
        " input); use method='svd' for this weight"
    )
  n = stats['sum_of_abs'].shape
  if n != (layout.in_size,):
    raise ValueError(f'{name}: statistics are for {n[0]} input channels but'
                     f' the kernel contracts {layout.in_size}')
  for key, value in stats.items():
    if not bool(jnp.all(jnp.isfinite(value))):
      raise ValueError(f'{name}: calibration statistic {key} holds NaN/Inf')


def abs_mean(stats):
  """E|x_i| per input channel (in,)."""
  return stats['sum_of_abs'] / stats['count']


def second_moment(stats):
  """E[x^T x] (in, in)."""
  return stats['sum_of_xtx'] / stats['count']
