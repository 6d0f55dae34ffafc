"""Per-layer quality and size report of a quantized param tree.

For each quantized weight: relative weight error ||W - W_hat||_F / ||W||_F,
SNR in dB, and, where calibration statistics exist, the relative output error
sqrt(tr(D^T R D) / tr(W^T R W)) on the calibration distribution (R = E[x^T x],
no second pass over data), before (base quantizer alone) and after the
low-rank reconstruction; plus bits per weight counting the quantized values
(logical qtype width: Qwix stores int2/int3 in int4 containers), scales, zero
points and the factors A, B. With activation quantization and a token
sample in the statistics, the two terms of SVDQuant's error bound (weight
error vs activation error), before (PTQ) and as stored.
"""

import dataclasses
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer import _qwix
from lqer.core import metrics
from lqer.core.paths import path_str
from lqer.offline.params import rotated_stats
from lqer.quant import bases
from lqer.quant import packing
from lqer.quant import stats as stats_lib
from lqer.quant.bits import bits_per_weight
from lqer.quant.bits import qtype_name
from lqer.quant.rule import match_rule
from lqer.quant.weight import WithLqer
from lqer.quant.weight import divide_along
from lqer.quant.weight import layout_of


@dataclasses.dataclass
class LayerReport:
  """One quantized weight. Errors are None where they cannot be computed.

  Attributes:
    path: the param path, 'block_0/mlp/up/kernel'.
    shape: the kernel's shape.
    qtype: the weight's qtype name ('int4').
    group_size: rows per scale along the contracting axis (None: per channel).
    rank: rank k of A B (0: plain PTQ).
    method: the rule's method.
    weight_error_base, weight_error: ||W - W_hat||_F / ||W||_F of plain PTQ
      and of the reconstruction W_hat = deq(Wq) + A B.
    snr_db_base, snr_db: 10 log10(||W||^2 / ||W - W_hat||^2), both.
    output_error_base, output_error: ||X (W - W_hat)||_F / ||X W||_F on the
      calibration distribution (from E[x^T x]), both.
    bits_per_weight: stored bits per weight (`lqer.quant.bits`).
    num_weights: elements of the kernel.
    bound_weight_base, bound_act_base, bound_weight, bound_act: SVDQuant's
      bound terms, see below.
    unseen_channels: input channels whose calibration max |x| was 0 (their
      statistics carry no evidence; SVDQuant keeps lam = 1 there).
  """

  path: str
  shape: tuple[int, ...]
  qtype: str
  group_size: int | None
  rank: int
  method: str
  weight_error_base: float
  weight_error: float
  snr_db_base: float
  snr_db: float
  output_error_base: float | None
  output_error: float | None
  bits_per_weight: float
  num_weights: int
  # SVDQuant's bound terms (`metrics.error_bound_terms`) on the calibration
  # sample, over ||X|| ||W||: plain PTQ of W (base) and the quantized matmul
  # as stored, (X / s) and diag(s) (W - A B) against Q(X / s) and deq(Wq).
  # None without an act_qtype or a sample.
  bound_weight_base: float | None = None
  bound_act_base: float | None = None
  bound_weight: float | None = None
  bound_act: float | None = None
  # None without statistics.
  unseen_channels: int | None = None


# LayerReport's bound-term fields and their table headings.
BOUND_FIELDS = {
  'bound_weight_base': 'W-term base',
  'bound_act_base': 'X-term base',
  'bound_weight': 'W-term',
  'bound_act': 'X-term',
}


@dataclasses.dataclass
class Report:
  """All quantized weights and a parameter-weighted model total.

  Attributes:
    layers: one `LayerReport` per quantized weight.
    left_float: the float params of 2+ axes (biases aside) that no rule
      quantized, so a rule that missed its module shows up here.
  """

  layers: list[LayerReport]
  left_float: list[str] = dataclasses.field(default_factory=list)

  def total(self) -> dict[str, Any]:
    n = np.array([l.num_weights for l in self.layers], float)

    def avg(field):
      vals = [getattr(l, field) for l in self.layers]
      if not vals or any(v is None for v in vals):
        return None
      return float(np.sum(n * np.array(vals)) / n.sum())

    return {
      'path': 'TOTAL',
      'num_weights': int(n.sum()),
      'bits_per_weight': avg('bits_per_weight'),
      'weight_error_base': avg('weight_error_base'),
      'weight_error': avg('weight_error'),
      'output_error_base': avg('output_error_base'),
      'output_error': avg('output_error'),
      **{f: avg(f) for f in BOUND_FIELDS},
    }

  def to_dicts(self) -> list[dict[str, Any]]:
    return [dataclasses.asdict(l) for l in self.layers]

  def table(self) -> str:
    bounds = [
      f
      for f in BOUND_FIELDS
      if any(getattr(l, f) is not None for l in self.layers)
    ]
    head = (
      'path',
      'shape',
      'qtype',
      'group',
      'rank',
      'method',
      'w.err base',
      'w.err',
      'SNR dB',
      'out.err base',
      'out.err',
      *[BOUND_FIELDS[f] for f in bounds],
      'bits/w',
    )
    fmt = lambda v: '-' if v is None else f'{v:.4f}'
    rows = [
      (
        l.path,
        'x'.join(map(str, l.shape)),
        l.qtype,
        str(l.group_size or '-'),
        str(l.rank),
        l.method,
        fmt(l.weight_error_base),
        fmt(l.weight_error),
        f'{l.snr_db:.1f}',
        fmt(l.output_error_base),
        fmt(l.output_error),
        *[fmt(getattr(l, f)) for f in bounds],
        f'{l.bits_per_weight:.2f}',
      )
      for l in self.layers
    ]
    t = self.total()
    rows.append(
      (
        'TOTAL',
        f'{t["num_weights"]} w',
        '',
        '',
        '',
        '',
        fmt(t['weight_error_base']),
        fmt(t['weight_error']),
        '',
        fmt(t['output_error_base']),
        fmt(t['output_error']),
        *[fmt(t[f]) for f in bounds],
        fmt(t['bits_per_weight']),
      )
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: '  '.join(
      c.rjust(w) if i > 0 else c.ljust(w)
      for i, (c, w) in enumerate(zip(r, widths))
    )
    lines = [line(head), line(['-' * w for w in widths])]
    lines += [line(r) for r in rows]
    unseen = [
      f'{l.path} ({l.unseen_channels})'
      for l in self.layers
      if l.unseen_channels
    ]
    if unseen:
      lines.append(
        'input channels calibration never saw (max |x| = 0; SVDQuant keeps'
        f' lam = 1 there): {", ".join(unseen)}'
      )
    if self.left_float:
      lines.append(
        f'left in float ({len(self.left_float)}): ' + ', '.join(self.left_float)
      )
    return '\n'.join(lines)

  __str__ = table


def report(
  fp_params: Any, quantized: Any, calibration: Any = None, rules=None
) -> Report:
  """Builds the report for every quantized weight of `quantized`.

  Args:
    fp_params: the float params (pure dict), as given to lqer_quantize_params.
    quantized: the Linen params tree it returned, or for NNX the quantized
      model (after nnx.update), whose attributes hold the `WithLqer` weights.
    calibration: the quant_stats tree; enables the output errors (and,
      with a token sample, the bound terms).
    rules: the rules, for the activation settings of plain Qwix weights
      (an `LqerRule`'s weights carry their own).

  Returns:
    A `Report`: `.table()` (also `str()`) is the per-layer table, `.total()`
    the parameter-weighted model total.
  """
  layers, left_float = [], []
  for path, w in flax.traverse_util.flatten_dict(fp_params).items():
    q = _qwix.get_value_from_path(quantized, path)
    if isinstance(q, nnx.Variable):
      q = q.get_value()
    if isinstance(q, dict) and 'array' in q:
      raise TypeError(
        f'report: {path_str(path)} is a pure dict (what lqer_quantize_params'
        ' returns for NNX, for nnx.update); pass the quantized NNX model'
        ' after nnx.update(model, params) instead, whose attributes hold the'
        ' WithLqer weights'
      )
    if not isinstance(q, _qwix.WithAux):
      if jnp.ndim(w) >= 2 and path[-1] != 'bias':
        left_float.append(path_str(path))
      continue
    q = jax.tree.map(_qwix.unbox, q)
    rule = None if rules is None else match_rule(rules, path)
    layers.append(
      _layer_report(
        path,
        jnp.asarray(w).reshape(q.shape),
        q,
        stats_lib.lookup(calibration, path),
        rule,
      )
    )
  return Report(layers, left_float)


def _layer_report(path, w, q: _qwix.WithAux, stats, rule) -> LayerReport:
  rotation = getattr(q, 'rotation', None)
  if rotation is not None:
    # Compare in the rotated basis the weight is stored in: x W = (x H)(Hᵀ W)
    # and H is orthogonal, so every error below is the float basis' error.
    w = q.rotated_kernel(w)
    if stats is not None:
      stats = rotated_stats(
        stats, np.asarray(_qwix.unbox(rotation)), path_str(path)
      )
  base = qwix.dequantize(packing.as_qarray(q.array)).astype(jnp.float32)
  layout = layout_of(q)
  a = b = None
  rank, method = 0, 'ptq'
  if isinstance(q, WithLqer):
    if q.input_scale is not None:
      base = divide_along(base, q.input_scale, layout.contracting_axes)
    if q.rank:
      a, b = layout.merge_factors(*q.factors())
      rank, method = q.rank, q.rule.method
  w_m = layout.to_matrix(w.astype(jnp.float32))
  base_m = layout.to_matrix(base)
  hat_m = (
    base_m
    if a is None
    else base_m + jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  )
  out_base = out = None
  flat = lambda m: m.reshape(-1, m.shape[-1])
  w_f, base_f, hat_f = flat(w_m), flat(base_m), flat(hat_m)
  if stats is not None and 'sum_of_xtx' in stats and not layout.batch_axes:
    r = stats_lib.second_moment(stats)
    out_base = float(metrics.relative_output_error(w_m, base_m, r))
    out = float(metrics.relative_output_error(w_m, hat_m, r))
  tiles = list(q.how.tiled_axes.values())
  bounds = {}
  act_rule = getattr(q, 'rule', None) or rule
  if (
    stats is not None
    and 'sample' in stats
    and not layout.batch_axes
    and getattr(act_rule, 'act_qtype', None) is not None
  ):
    bounds = _bound_terms(
      w, w_m, q, layout, stats_lib.sample(stats), act_rule, a, b
    )
  unseen = None
  if stats is not None and 'max_of_abs' in stats:
    unseen = int(jnp.sum(stats_lib.abs_max(stats) == 0))
  return LayerReport(
    path=path_str(path),
    shape=tuple(w.shape),
    qtype=qtype_name(q.how.qtype),
    group_size=int(tiles[0]) if tiles else None,
    rank=rank,
    method=method,
    weight_error_base=float(metrics.relative_weight_error(w_f, base_f)),
    weight_error=float(metrics.relative_weight_error(w_f, hat_f)),
    snr_db_base=float(metrics.snr_db(w_f, base_f)),
    snr_db=float(metrics.snr_db(w_f, hat_f)),
    output_error_base=out_base,
    output_error=out,
    bits_per_weight=bits_per_weight(q),
    num_weights=int(w.size),
    unseen_channels=unseen,
    **bounds,
  )


def _bound_terms(w, w_m, q, layout, x, rule, a, b):
  """SVDQuant's bound terms of PTQ and of `q` as stored (LayerReport).

  The sample x is (tokens, in), the contracting axes flattened, and is
  quantized per token tiled along that flat axis; Qwix tiles the input's
  last axis, which is the same for one contracting axis and only close to
  it for several."""
  tile = rule.tile_size if isinstance(rule.tile_size, int) else None
  how = _qwix.HowToQuantize(
    qtype=rule.act_qtype,
    channelwise_axes=[0],
    tiled_axes={1: tile} if tile and x.shape[1] % tile == 0 else {},
    calibration_method=rule.act_calibration_method or 'absmax',
  )
  quant_x = lambda v: qwix.dequantize(_qwix.quantize(v, how))
  ptq_w = layout.to_matrix(
    qwix.dequantize(bases.rtn(w, q.how, layout, None)[0]).astype(jnp.float32)
  )
  scale = getattr(q, 'input_scale', None)
  s = jnp.ones((layout.in_size,)) if scale is None else scale
  target = (
    w_m
    if a is None
    else w_m - jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  )
  target = target * s[:, None]
  stored = layout.to_matrix(
    qwix.dequantize(packing.as_qarray(q.array)).astype(jnp.float32)
  )
  x_s = x / s
  unit = float(jnp.linalg.norm(x) * jnp.linalg.norm(w_m))
  before = metrics.error_bound_terms(x, quant_x(x), w_m, ptq_w)
  after = metrics.error_bound_terms(x_s, quant_x(x_s), target, stored)
  return dict(
    zip(
      ('bound_weight_base', 'bound_act_base', 'bound_weight', 'bound_act'),
      (float(t) / unit for t in (*before, *after)),
    )
  )
