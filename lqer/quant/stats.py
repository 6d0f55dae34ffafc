"""Calibration statistics of one op's input: exact token means.

Stored in the `quant_stats` collection under `<weight name>_lqer` as sums and
a token count, the format of Qwix's `SimpleMovingAverage` (so its
`get_calibration` gives the same means):

    count        number of tokens seen (int32)
    sum_of_abs   sum_t |x_t|        (in,)
    max_of_abs   max_t |x_t|        (in,)  (SmoothQuant / SVDQuant smoothing)
    sum_of_xtx   sum_t x_t^T x_t    (in, in)
    sample       (n, in) tokens, `sample_rows` written so far: evenly spaced
                 tokens of the latest batches, kept when the rule quantizes
                 activations (the report's activation-error bound terms)

Dividing by the token count, not the number of batches, makes the mean exact
when batches differ in size. Memory: sum_of_xtx is 4 in^2 bytes in float32,
e.g. 485 MB for in = 11008.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lqer import _qwix

SUFFIX = '_lqer'


def batch_sums(
  x: jax.Array, with_second_moment: bool = True, sample_tokens: int = 0
):
  """Statistics of x (tokens, in): count, sum |x|, max |x|, sum x^T x, and
  `sample_tokens` evenly spaced tokens (none if 0)."""
  x = x.astype(jnp.float32)
  sums = {
    'count': jnp.asarray(x.shape[0], jnp.int32),
    'sum_of_abs': jnp.sum(jnp.abs(x), axis=0),
    'max_of_abs': jnp.max(jnp.abs(x), axis=0),
  }
  if with_second_moment:
    sums['sum_of_xtx'] = gram(x)
  if sample_tokens:
    rows = np.linspace(0, x.shape[0] - 1, min(sample_tokens, x.shape[0]))
    picked = x[np.round(rows).astype(int)]
    sums['sample'] = (
      jnp.zeros((sample_tokens, x.shape[1]), jnp.float32)
      .at[: len(rows)]
      .set(picked)
    )
    sums['sample_rows'] = jnp.asarray(len(rows), jnp.int32)
  return sums


def gram(x: jax.Array, block: int = 1024) -> jax.Array:
  """x^T x (in, in) of x (tokens, in), computing only the `block`-wide
  column blocks on and above the diagonal, G[b, a] = G[a, b]^T: (c + 1) / 2c
  of the full product's multiplies for c blocks (0.58 for in = 11008)."""
  edges = list(range(0, x.shape[1], block)) + [x.shape[1]]
  cols = [x[:, lo:hi] for lo, hi in zip(edges, edges[1:])]
  upper = {
    (a, b): jnp.matmul(cols[a].T, cols[b], precision=jax.lax.Precision.HIGHEST)
    for a in range(len(cols))
    for b in range(a, len(cols))
  }
  return jnp.block(
    [
      [upper[a, b] if a <= b else upper[b, a].T for b in range(len(cols))]
      for a in range(len(cols))
    ]
  )


def accumulate(total, batch):
  """The running statistics with one batch's added: sums add, maxima take
  the max, a batch's sample rows overwrite the oldest ones (cyclically)."""
  if total.keys() != batch.keys():
    raise ValueError(
      f'statistics keys differ: {sorted(total)} vs {sorted(batch)}'
    )
  out = {
    k: jnp.add(total[k], batch[k])
    for k in total
    if k not in ('max_of_abs', 'sample')
  }
  out['max_of_abs'] = jnp.maximum(total['max_of_abs'], batch['max_of_abs'])
  if 'sample' in total:
    n = total['sample'].shape[0]
    slots = (total['sample_rows'] + jnp.arange(n)) % n
    keep = jnp.arange(n) < batch['sample_rows']
    out['sample'] = (
      total['sample']
      .at[jnp.where(keep, slots, n)]
      .set(batch['sample'], mode='drop')
    )
  return out


def lookup(calibration, path):
  """The stats of the weight at `path` in a quant_stats tree, or None."""
  if calibration is None:
    return None
  stats = _qwix.get_value_from_path(
    calibration, (*path[:-1], str(path[-1]) + SUFFIX)
  )
  return _qwix.unbox(stats) if stats is not None else None


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
    raise ValueError(
      f'{name}: statistics are for {n[0]} input channels but'
      f' the kernel contracts {layout.in_size}'
    )
  for key, value in stats.items():
    if not bool(jnp.all(jnp.isfinite(value))):
      raise ValueError(f'{name}: calibration statistic {key} holds NaN/Inf')


def abs_mean(stats):
  """E|x_i| per input channel (in,)."""
  return stats['sum_of_abs'] / stats['count']


def abs_max(stats):
  """max |x_i| per input channel (in,)."""
  return stats['max_of_abs']


def sample(stats):
  """The sampled tokens (rows, in) (only rows written so far)."""
  return stats['sample'][
    : min(int(stats['sample_rows']), stats['sample'].shape[0])
  ]


def scaled(stats, s):
  """The statistics of x / s (s per input channel, (in,)): what a layer
  whose input is smoothed by s sees."""
  out = dict(stats)
  for key in ('sum_of_abs', 'max_of_abs'):
    out[key] = stats[key] / s
  if 'sum_of_xtx' in stats:
    out['sum_of_xtx'] = stats['sum_of_xtx'] / s[:, None] / s[None, :]
  if 'sample' in stats:
    out['sample'] = stats['sample'] / s
  return out


def second_moment(stats):
  """E[x^T x] (in, in)."""
  return stats['sum_of_xtx'] / stats['count']
