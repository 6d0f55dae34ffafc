"""Base quantizers: the quantized weight whose error the factors carry.

Each is a plain function with one signature,

    base(w, how, layout, stats) -> (QArray, input_scale or None)

w: the float kernel; how: Qwix's `HowToQuantize` for it; layout: its
`KernelLayout`; stats: its calibration statistics (`lqer.quant.stats`) or None.
The base weight is deq(QArray), divided by input_scale along the contracting
axis when there is one (`lqer.quant.weight.divide_along`).

* rtn:  Qwix PTQ's round to nearest, bit for bit (`qwix.quantize_params`).
* gptq: Qwix's GPTQ algorithm and settings on H = E[x^T x], jitted
        (`lqer.core.gptq`; Qwix's eager `gptq_core` compiles per column);
        `gptq_stacked` runs same-shaped weights as one vmapped call.
* awq:  Qwix's AWQ (`qwix.contrib.awq_core`) on mean |x|.
* stored: a base already quantized by Qwix (any of its transforms), kept.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lqer import _qwix
from lqer.core import gptq as gptq_lib
from lqer.quant import stats as stats_lib

NAMES = ('rtn', 'gptq', 'awq')
# What each base reads from the statistics (besides the method's needs).
NEEDS = {'rtn': None, 'gptq': 'sum_of_xtx', 'awq': 'sum_of_abs'}


@functools.partial(jax.jit, static_argnums=(1, 4))
def _quantize_with(w, qtype, scale, zero_point, noise_fn):
  return _qwix.quantize_with_scale_zero_point(
    w, qtype, scale, zero_point, noise_fn
  )


def rtn_scale(w, how):
  """Qwix PTQ's (scale, zero_point) of w. Eager: jitted, XLA may fold e.g.
  the clipping factor of 'absmax,0.9' into the scale differently (1 ulp)."""
  return _qwix.compute_scale_zero_point(_qwix.calibrate(w, how), how.qtype)


def rtn(w, how, layout, stats):
  """Qwix PTQ, bit for bit (the offline pass fuses the same
  `quantize_with_scale_zero_point` into its factor call:
  `lqer.quant.factor`)."""
  del layout, stats
  return _quantize_with(w, how.qtype, *rtn_scale(w, how), how.noise_fn), None


_RTN_STACKED = {}


def rtn_stacked(ws, how):
  """RTN of same-shaped weights ws[i] in one jitted, vmapped call (their
  QArrays stacked on axis 0). The scale is computed under jit, which may
  differ from Qwix's eager one by an ulp: for refinement's re-quantization,
  not for the first base (`rtn`)."""
  key = repr(how)
  if key not in _RTN_STACKED:

    def one(w):
      scale, zero_point = _qwix.compute_scale_zero_point(
        _qwix.calibrate(w, how), how.qtype
      )
      return _qwix.quantize_with_scale_zero_point(
        w, how.qtype, scale, zero_point, how.noise_fn
      )

    _RTN_STACKED[key] = jax.jit(jax.vmap(one))
  return _RTN_STACKED[key](ws)


def _normalized(w, how, layout):
  """w as Qwix's contrib algorithms take it: (out, in), and the inverse."""
  axis = layout.contracting_axes[0]
  w_norm, restore = _qwix.normalize_weight(w, axis)
  how = dataclasses.replace(how, channelwise_axes=[0])
  if axis in how.tiled_axes:
    how = dataclasses.replace(how, tiled_axes={1: how.tiled_axes[axis]})
  return w_norm, how, restore


def gptq(w, how, layout, stats):
  """GPTQ on the Hessian E[x^T x] of the layer's input: Qwix's algorithm and
  settings (`gptq_core.quantize_weight`), compiled once per shape."""
  w_norm, how_norm, restore = _normalized(w, how, layout)
  q = gptq_lib.quantize_weight(w_norm, stats_lib.second_moment(stats), how_norm)
  return restore(q), None


def gptq_stacked(ws, how, layout, stats):
  """`gptq` of same-shaped weights ws[i] on stats[i] as one vmapped call:
  (their QArrays stacked on a new axis 0, None), as stacking n `gptq` calls."""
  normed = [_normalized(w, how, layout) for w in ws]
  _, how_norm, restore = normed[0]
  q = gptq_lib.quantize_stacked(
    jnp.stack([w for w, _, _ in normed]),
    jnp.stack([stats_lib.second_moment(s) for s in stats]),
    how_norm,
  )
  return jax.vmap(restore)(q), None


def awq(w, how, layout, stats):
  """Qwix's AWQ: Q(W diag(s)) with s searched on mean |x|; base = deq / s."""
  w_norm, how_norm, restore = _normalized(w, how, layout)
  q, scales = _qwix.awq_quantize_weight(
    w_norm, stats_lib.abs_mean(stats), how_norm
  )
  return restore(q), scales.reshape(-1)


def stored(q, input_scale, w, how, layout, stats):
  """A base quantized elsewhere (bind q, input_scale with functools.partial)."""
  del w, how, layout, stats
  return q, input_scale


BY_NAME = {'rtn': rtn, 'gptq': gptq, 'awq': awq}
