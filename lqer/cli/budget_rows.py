"""The rows `lqer eval --budget` compares its allocated factors with.

A budget of extra bits per weight can go to factors (the allocated and
uniform-rank rows of `eval.eval_rows`), to more base bits, or to both:

* `equal_bits_rows`: plain PTQ at the widths that bracket the budget's
  bits per weight, and mixed-precision PTQ spending the budget on wider
  weights where the output damage is (`allocation.allocate_widths`);
* `mixed_factor_rules`: factors on a mixed-precision base, a share of the
  budget on widths and the rest on allocated ranks (`eval.eval_rows`'s
  '<method> +mixed' row);
* `budget_choice`: which of the rows spending the budget the calibration
  text picks (its output divergence from the float model,
  `lqer.offline.tune.output_divergence`), beside the evaluation's winner.
"""

import dataclasses
import math
import time
from typing import Any, Iterator

import flax
import jax.numpy as jnp
import numpy as np

from lqer import _qwix
from lqer.cli import common
from lqer.cli import tasks
from lqer.core.paths import path_str
from lqer.offline import allocation
from lqer.offline.tune import output_divergence
from lqer.quant import bits as bits_lib
from lqer.quant import recipes
from lqer.quant import stats as stats_lib

# The '+mixed' rows: this share of the budget goes to wider weights, the
# rest to allocated ranks on them.
MIXED_SHARE = 0.5
# The calibration divergence's column in the table.
CALIB_DIV = 'calib div'


@dataclasses.dataclass
class EqualBits:
  """One equal-bits PTQ setting: its label, widths, params and cost."""

  method: str
  bits: int | str
  model: Any
  params: Any
  bits_per_weight: float
  seconds: float


@dataclasses.dataclass
class WidthOptions:
  """Every quantized weight at every width from the base to 8 bits (RTN).

  options: {param path: [(stored bits, output damage), ...]}, narrowest
  first (`allocation.allocate_widths`' input); passes: {width: (model,
  params, seconds)}; bits_per_weight: {width: uniform PTQ's}; seconds:
  the passes' and damages' total.
  """

  bits: int
  options: dict
  passes: dict
  bits_per_weight: dict
  num_weights: int
  seconds: float

  def widths(self, extra_bits: float) -> tuple[dict, float]:
    """({module path: width}, bits per weight spent) of the greedy mixed
    precision under `extra_bits` per weight."""
    chosen = allocation.allocate_widths(
      self.options, math.floor(extra_bits * self.num_weights)
    )
    widths = {path_str(p[:-1]): self.bits + i for p, i in chosen.index.items()}
    return widths, chosen.spent_bits / self.num_weights


def width_options(
  task: tasks.Task,
  bits: int,
  tile_size,
  stats,
  compute_dtype=jnp.float32,
  act_bits=None,
  **rule_kw,
) -> WidthOptions:
  """RTN passes at `bits` to 8 and each weight's damage at each width:
  Σ_o E[g_o²] (Dᵀ R D)_oo of its RTN error D (`allocation.error_damage`,
  the output-gradient statistics the budget's allocation uses); bits as
  the report counts them (`lqer.quant.bits`)."""
  start = time.perf_counter()
  fp = flax.traverse_util.flatten_dict(task.params)
  options, passes, total_bits, sizes = {}, {}, {}, {}
  for width in range(bits, 9):
    model, params, secs = tasks.quantize(
      task,
      _rules(task, width, tile_size, act_bits, **rule_kw),
      stats,
      'rtn',
      compute_dtype,
    )
    passes[width] = (model, params, secs)
    total_bits[width] = 0
    for path, q in flax.traverse_util.flatten_dict(params).items():
      if not isinstance(q, _qwix.WithAux):
        continue
      n = int(np.prod(q.shape))
      stored = round(bits_lib.bits_per_weight(q) * n)
      damage = allocation.error_damage(
        fp[path], q, stats_lib.lookup(stats, path)
      )
      options.setdefault(path, []).append((stored, damage))
      total_bits[width] += stored
      sizes[path] = n
  num_weights = sum(sizes.values())
  return WidthOptions(
    bits,
    options,
    passes,
    {u: b / num_weights for u, b in total_bits.items()},
    num_weights,
    time.perf_counter() - start,
  )


def _rules(task, width, tile_size, act_bits, rank=None, method='svd', **kw):
  return recipes.build_rules(
    task.params,
    task.module_path,
    width,
    tile_size,
    rank,
    method,
    act_bits=act_bits,
    **kw,
  )[0]


def bracket_widths(bpw_by_width: dict, target: float) -> list[int]:
  """The integer widths whose uniform PTQ bits per weight bracket `target`:
  the widest at or below it and the narrowest at or above it (one width
  when it lands on target, none above the widest)."""
  below = [u for u, b in bpw_by_width.items() if b <= target + 1e-9]
  above = [u for u, b in bpw_by_width.items() if b >= target - 1e-9]
  return sorted(
    {*([max(below)] if below else []), *([min(above)] if above else [])}
  )


def equal_bits_rows(
  task: tasks.Task,
  bits: int,
  tile_size,
  budget: float,
  stats,
  base='rtn',
  compute_dtype=jnp.float32,
  act_bits=None,
  options: WidthOptions | None = None,
  **rule_kw,
) -> Iterator[EqualBits]:
  """PTQ that spends a budget's bits on more base bits instead of factors.

  The budget's bits per weight are the W`bits` PTQ row's plus `budget`.
  Yields: uniform PTQ at the widths that bracket them (`bracket_widths`;
  the width `bits` itself is the PTQ row already printed), then mixed
  precision: every weight's width (`bits` to 8) chosen greedily under the
  budget by output damage removed per bit (`WidthOptions.widths`).
  options: `width_options` of these settings (computed here if None; its
  seconds count into the mixed row's).
  """
  if options is None:
    options = width_options(
      task, bits, tile_size, stats, compute_dtype, act_bits, **rule_kw
    )
  bpw = options.bits_per_weight
  label = 'PTQ' if base == 'rtn' else base.upper()
  for width in bracket_widths(bpw, bpw[bits] + budget):
    if width == bits:
      continue
    model, params, secs = options.passes[width]
    if base != 'rtn':
      model, params, secs = tasks.quantize(
        task,
        _rules(task, width, tile_size, act_bits, **rule_kw),
        stats,
        base,
        compute_dtype,
      )
    yield EqualBits(label, width, model, params, bpw[width], secs)
  if bits == max(options.passes):
    return  # no wider width to spend the budget on
  start = time.perf_counter()
  widths, spent = options.widths(budget)
  model, params, secs = tasks.quantize(
    task,
    _rules(task, bits, tile_size, act_bits, widths=widths, **rule_kw),
    stats,
    base,
    compute_dtype,
  )
  yield EqualBits(
    f'{label} mixed',
    width_label(widths, bits),
    model,
    params,
    bpw[bits] + spent,
    options.seconds + secs + time.perf_counter() - start,
  )


def width_label(widths: dict, bits: int) -> str:
  """'4/5/6': the widths a mixed-precision setting uses (the base's too)."""
  return '/'.join(map(str, sorted({bits, *widths.values()})))


def mixed_factor_rules(
  task: tasks.Task,
  options: WidthOptions,
  budget: float,
  method: str,
  tile_size,
  act_bits=None,
  **rule_kw,
) -> tuple[list, dict, float]:
  """(rules, widths, factor budget) of factors on a mixed-precision base:
  `MIXED_SHARE` of the budget on wider weights (`WidthOptions.widths`),
  the bits per weight it leaves for ranks allocated on them."""
  widths, spent = options.widths(MIXED_SHARE * budget)
  rules = _rules(
    task,
    options.bits,
    tile_size,
    act_bits,
    rank='auto',
    method=method,
    widths=widths,
    **rule_kw,
  )
  return rules, widths, budget - spent


def calibration_divergence(task: tasks.Task, model, params) -> float:
  """The quantized model's output divergence from the float model on the
  calibration side (`task.gradient_batches`, else the calibration
  batches): KL per position for logits, relative squared error else."""
  return output_divergence(
    lambda p, *b: model.apply({'params': p}, *b),
    params,
    lambda p, *b: task.module.apply({'params': p}, *b),
    task.params,
    task.gradient_batches or task.calib_batches,
    'softmax' if task.output == 'softmax' else 'mse',
  )


def budget_choice(rows) -> list[str]:
  """One line per budget: the row spending at most it (`within_budget`)
  with the lowest calibration divergence (what a budget can choose by
  without evaluation text), and how it scores against the evaluation's
  best."""
  groups = {}
  for r in rows:
    if common.within_budget(r) and CALIB_DIV in r.extra:
      groups.setdefault((r.act_bits, r.calib, r.budget), []).append(r)
  lines = []
  label = lambda r: (
    f'{r.method} W{r.bits}' if common.is_ptq(r) else f'{r.method} rank {r.rank}'
  )
  for (_, calib, budget), group in groups.items():
    chosen = min(group, key=lambda r: r.extra[CALIB_DIV])
    best = min(group, key=lambda r: r.value)
    lines.append(
      f'budget {budget:g}{f", calib {calib}" if calib else ""}: the'
      f' calibration divergence chooses {label(chosen)}'
      f' ({chosen.extra[CALIB_DIV]:.4g}; {chosen.metric}'
      f' {chosen.value:.4f}); '
      + (
        'the evaluation agrees'
        if chosen is best
        else f'the evaluation prefers {label(best)} ({best.value:.4f})'
      )
    )
  return lines
