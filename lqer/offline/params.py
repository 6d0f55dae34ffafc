"""`lqer_quantize_params`: the offline pass from float params to LQER params.

plan -> group -> factor. The plan (here) pairs every float param with its
abstract counterpart and decides, with clear errors, what it becomes: a
`WithLqer` (a rule with a rank), a plain Qwix weight (no rank;
`qwix.quantize_params` does it, static activation scales included), or
itself. `lqer.offline.jobs` groups same-shaped weights with the same settings
and
gives each group its bases and factors in one jitted call, a bounded number
of bytes at a time.
"""

import functools
import re
from typing import Any, Mapping, Sequence
import warnings

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer import _qwix
from lqer.core import rotation as rotation_lib
from lqer.core.paths import path_str
from lqer.offline import allocation
from lqer.offline import jobs
from lqer.quant import bases
from lqer.quant import factor
from lqer.quant import stats as stats_lib
from lqer.quant.rule import LqerRule
from lqer.quant.rule import match_rule
from lqer.quant.rule import same_qtype
from lqer.quant.weight import WithLqer
from lqer.quant.weight import layout_of

# The key of the rotation's signs in statistics collected on a rotated
# input (`lqer.providers.calibration`; `rotated_stats` checks it).
ROTATION_KEY = 'rotation'


def lqer_quantize_params(
  params: Any,
  abstract_params: Any,
  rules_or_quant_stats: Any = None,
  *,
  calibration: Any = None,
  base: Any = 'rtn',
  allow_extra_params: bool = False,
  budget_bits: float | None = None,
  max_group_bytes: int = 1 << 30,
  progress: bool = False,
  return_allocation: bool = False,
) -> Any:
  """Quantizes a float param tree into LQER params.

  A drop-in for `qwix.quantize_params(params, abstract, quant_stats)`.

  Args:
    params: float params, unboxed (Linen) or `nnx.to_pure_dict` (NNX). May be
      a subtree of the model's params, as with `qwix.quantize_params`.
    abstract_params: the tree from `LqerProvider` (each reconstructed weight
      an abstract `WithLqer` carrying its rule) or, with rules, from
      `qwix.PtqProvider` (plain `WithAux`). For NNX, the abstract model.
    rules_or_quant_stats: either Qwix's `quant_stats` (static-range
      activation scales, as the third argument of `qwix.quantize_params`),
      or a sequence of `LqerRule`s, needed only with a PtqProvider abstract
      tree: their rank decides which weights get factors.
    calibration: the `quant_stats` collection from `LqerCalibrationProvider`;
      required for methods 'l2qer' and 'qera' and for bases 'gptq' / 'awq'.
    base: the quantizer whose error is reconstructed: 'rtn' (Qwix PTQ,
      round to nearest), 'gptq' or 'awq' (qwix.contrib, driven by the same
      statistics), or a param tree already quantized by Qwix (e.g. by
      `qwix.contrib.gptq.quantize_params` against a PtqProvider tree): its
      quantized weights are kept as they are and their error reconstructed.
    allow_extra_params: as in `qwix.quantize_params`.
    budget_bits: extra bits per weight, averaged over every weight this call
      quantizes, for the rules with rank='auto': fixed-rank factors and
      input scales count against it, and the rest is allocated across the
      'auto' weights (each weight's rank, 0 allowed, shows in `lqer.report`;
      checkpoints keep it). Or a `lqer.Budget(bits, probe=...)` (or
      `normalize=...`) to choose how layers are compared.
    max_group_bytes: float bytes of weights stacked into one jitted call.
    progress: show a progress bar over weight groups.
    return_allocation: also return the `lqer.Allocation` the budget gave
      (ranks, term values, probed damage; None without a budget).

  Returns:
    The quantized params, same structure as `params` (a pure dict for NNX);
    with `return_allocation`, (params, allocation).
  """
  rules, quant_stats = _split_third_argument(rules_or_quant_stats)
  if isinstance(base, str) and base not in bases.NAMES:
    raise ValueError(
      f'base must be one of {bases.NAMES} or a Qwix-quantized'
      f' param tree, got {base!r}'
    )
  planned, plain, num_quantized = _plan(
    params, abstract_params, rules, calibration, base, allow_extra_params
  )
  allocator = _allocator(planned, budget_bits, num_quantized, params)
  out = jobs.run_jobs(planned, max_group_bytes, progress, allocator)
  ptq_out = (
    qwix.quantize_params(
      flax.traverse_util.unflatten_dict(plain),
      abstract_params,
      quant_stats,
      allow_extra_params=allow_extra_params,
    )
    if plain or quant_stats
    else {}
  )
  if isinstance(abstract_params, nnx.Module) and out:
    # As qwix.quantize_params: WithLqer -> pure dicts that nnx.update takes.
    out = flax.traverse_util.flatten_dict(
      flax.traverse_util.unflatten_dict(nnx.to_pure_dict(nnx.state(out)))
    )
  out.update(flax.traverse_util.flatten_dict(ptq_out))
  out = flax.traverse_util.unflatten_dict(out)
  if return_allocation:
    return out, None if allocator is None else allocator.result()
  return out


def _allocator(planned, budget_bits, num_quantized, params):
  """The `allocation.Allocator` of rank 'auto' (None without a budget),
  checked both ways."""
  auto = [j.name for j in planned if j.rule.auto_rank]
  if auto and budget_bits is None:
    raise ValueError(
      f"{auto[0]} (and {len(auto) - 1} more): its rule has rank='auto',"
      ' which needs lqer_quantize_params(..., budget_bits=<extra bits per'
      ' weight>) to allocate ranks'
    )
  if budget_bits is None:
    return None
  budget = (
    budget_bits
    if isinstance(budget_bits, allocation.Budget)
    else allocation.Budget(budget_bits)
  )
  return allocation.Allocator(budget, num_quantized, params)


def _split_third_argument(value):
  """(rules, quant_stats) from the third argument of lqer_quantize_params."""
  if value is None:
    return None, {}
  if isinstance(value, Mapping | nnx.State):
    return None, value
  if isinstance(value, Sequence) and all(
    isinstance(r, qwix.QuantizationRule) for r in value
  ):
    return list(value), {}
  raise TypeError(
    'lqer_quantize_params: the third argument must be a sequence of'
    ' QuantizationRules (with a PtqProvider abstract tree) or the'
    f' quant_stats mapping of qwix.quantize_params, got {type(value)}'
  )


def _abstract_at(tree, path):
  value = _qwix.get_value_from_path(tree, path)
  return value.get_value() if isinstance(value, nnx.Variable) else value


def _plan(
  params, abstract_params, rules, calibration, base, allow_extra_params
):
  """Splits params into LQER jobs and the rest, validating every weight."""
  planned, plain = [], {}
  weight_modules = set()
  num_quantized = 0
  flat = flax.traverse_util.flatten_dict(params)
  for path, w in flat.items():
    abs_w = _abstract_at(abstract_params, path)
    if abs_w is None and allow_extra_params:
      continue
    if not isinstance(abs_w, _qwix.WithAux):
      plain[path] = w
      continue
    w = _fitted_weight(path, w, abs_w)
    num_quantized += w.size
    factor.check_tiles(path_str(path), w.shape, abs_w.how)
    rule = (
      abs_w.rule
      if isinstance(abs_w, WithLqer)
      else (match_rule(rules, path) if rules is not None else None)
    )
    weight_modules.add(path_str(path[:-1]))
    job = _make_job(path, w, abs_w, rule, base)
    if job is None:
      plain[path] = w
      continue
    factor.check_weight(job.name, job.weight, job.layout, job.rank)
    needs = bases.NEEDS.get(job.base_kind)
    if job.method_needs_stats or needs:
      job.stats = stats_lib.lookup(calibration, path)
      _check_stats(job, needs)
    _rotate(job, needs)
    planned.append(job)
  for rule in rules or ():
    if rule.weight_qtype is not None and not any(
      re.fullmatch(rule.module_path, m) for m in weight_modules
    ):
      warnings.warn(
        f'rule {rule} matches no weight of the param tree (its'
        ' module_path is matched against module paths such as'
        f' {", ".join(sorted({path_str(p[:-1]) for p in flat})[:4])}'
        ' ...)',
        stacklevel=3,
      )
  return planned, plain, num_quantized


def _fitted_weight(path, w, abs_w):
  """w as the op reads it (see `factor.check_shape`)."""
  name = path_str(path)
  if not isinstance(w, jax.Array | np.ndarray):
    raise TypeError(
      f'{name}: params must be a pure dict of arrays, got'
      f' {type(w).__name__} (unbox Linen params with'
      ' nn.unbox, NNX state with nnx.to_pure_dict)'
    )
  factor.check_shape(name, w.shape, abs_w.shape)
  return jnp.asarray(w).reshape(abs_w.shape)


def _make_job(path, w, abs_w, rule, base):
  """A `jobs.Job` if this weight needs more than plain Qwix PTQ, else None."""
  rotates = getattr(rule, 'rotate', None) is not None
  if isinstance(abs_w, WithLqer):
    rank = abs_w.rank
    if rule.method == 'svdquant' and rule.rank is not None:
      rank = rule.rank  # abs_w holds rank + error_rank columns
  else:
    rank = rule.rank if isinstance(rule, LqerRule) else None
    if rank == 'auto':
      rank = 0  # allocated by jobs.run_jobs
    if rank is None and rotates:
      rank = 0  # the rotated base alone
    elif rank is None:
      if isinstance(base, str) and base == 'rtn':
        return None
      rule, rank = LqerRule(weight_qtype=abs_w.how.qtype), 0
  try:
    layout = layout_of(abs_w)
  except ValueError as e:
    raise ValueError(f'{path_str(path)}: {e}') from None
  if rank > layout.max_rank and not isinstance(abs_w, WithLqer):
    # The earlier project's flow clipped silently; keep it running, loudly.
    warnings.warn(
      f'{path_str(path)}: rank {rank} is larger than the'
      f' {layout.in_size} x {layout.out_size} matrix allows; using rank'
      f' {layout.max_rank} (only with rules + a PtqProvider tree;'
      ' LqerProvider raises)',
      stacklevel=4,
    )
    rank = layout.max_rank
  if rotates and not isinstance(base, str):
    raise ValueError(
      f'{path_str(path)}: its rule rotates the weight (rotate='
      f'{rule.rotate!r}), but a stored base was quantized from the'
      " unrotated one; use base 'rtn', 'gptq' or 'awq', which quantize"
      ' the rotated weight'
    )
  if (
    rule.method == 'svdquant'
    and rule.rank is not None
    and (not isinstance(base, str) or base == 'awq')
  ):
    raise ValueError(
      f"{path_str(path)}: method 'svdquant' quantizes the residual of the"
      ' smoothed weight, which exists only after smoothing; use base'
      " 'rtn' or 'gptq' (not 'awq', which rescales channels itself, nor a"
      ' stored base)'
    )
  if isinstance(base, str):
    fn, kind = bases.BY_NAME[base], base
  else:
    q, input_scale = _stored_base(path, base, abs_w)
    fn = functools.partial(bases.stored, q, input_scale)
    kind = 'stored' if input_scale is None else 'stored-awq'
  return jobs.Job(path, w, abs_w.how, layout, rule, rank, fn, kind)


def _stored_base(path, tree, abs_w):
  """(QArray, input_scale) stored at `path` of a Qwix-quantized tree."""
  name = path_str(path)
  value = _abstract_at(tree, path)
  if isinstance(value, _qwix.WithAux):
    # Qwix's AWQ weights carry awq_scale, lqer's their input_scale.
    q = value.array
    input_scale = getattr(
      value, 'awq_scale', getattr(value, 'input_scale', None)
    )
  elif isinstance(value, Mapping) and 'array' in value:  # NNX pure dict
    arr = value['array']
    q = qwix.QArray(
      qvalue=arr['qvalue'],
      scale=arr['scale'],
      zero_point=arr.get('zero_point'),
      qtype=abs_w.how.qtype,
    )
    input_scale = value.get('awq_scale', value.get('input_scale'))
  else:
    raise ValueError(
      f'{name}: base= tree holds no quantized weight here'
      f' (found {type(value).__name__}); pass the tree'
      ' returned by a Qwix quantize_params for the same model'
    )
  q = jax.tree.map(_qwix.unbox, q)
  if tuple(q.shape) != tuple(abs_w.shape) or not same_qtype(
    q.qtype, abs_w.how.qtype
  ):
    raise ValueError(
      f'{name}: base= tree holds a {q.qtype} weight of shape'
      f' {tuple(q.shape)}, the model quantizes it to'
      f' {abs_w.how.qtype} with shape {tuple(abs_w.shape)}'
    )
  if input_scale is not None and len(layout_of(abs_w).contracting_axes) != 1:
    raise ValueError(f'{name}: an AWQ base needs one contracting axis')
  return q, None if input_scale is None else _qwix.unbox(input_scale)


def _rotate(job: jobs.Job, base_needs) -> None:
  """With the rule's rotation: job.weight <- Hᵀ W, job.stats <- those of
  x H (`rotated_stats`), job.rotation <- the signs."""
  rule = job.rule
  signs = (
    rule.rotation_signs(job.layout.in_size, job.name)
    if getattr(rule, 'rotate', None) is not None
    else None
  )
  if job.stats is not None:
    needs_abs = (
      job.svdquant
      or (job.has_factors and rule.method == 'l2qer')
      or base_needs == 'sum_of_abs'
    )
    job.stats = rotated_stats(job.stats, signs, job.name, needs_abs)
  if signs is not None:
    job.weight = factor.rotated(job.weight, signs, job.layout)
    job.rotation = signs


def rotated_stats(stats, signs, name: str = '', needs_abs: bool = False):
  """The statistics of the rotated input x H, H the rotation of `signs`
  (None: no rotation).

  Statistics collected under the rotating rule (`LqerCalibrationProvider`
  rotates the input first and records the signs under `ROTATION_KEY`) are
  those already, all of them exact. Unrotated statistics are rotated where
  that is exact: E[(xH)ᵀ(xH)] = Hᵀ E[xᵀx] H and the token sample x H;
  max |x H| and mean |x H| per channel are not functions of the unrotated
  ones, so they are dropped, and refused where needed (`needs_abs`:
  SVDQuant's smoothing, L2QER, AWQ).

  Raises:
    ValueError (naming `name`): rotated statistics for an unrotated weight,
      statistics of another rotation (seed, rotate_block), or `needs_abs`
      with unrotated statistics.
  """
  marker = stats.get(ROTATION_KEY)
  if signs is None:
    if marker is not None:
      raise ValueError(
        f'{name}: these statistics are of a rotated input (collected under'
        ' an LqerRule with rotate), but the rule quantizing this weight'
        ' does not rotate; calibrate with the same rules as quantize'
      )
    return stats
  if marker is not None:
    marker = np.asarray(marker)
    if marker.shape != signs.shape or not np.array_equal(marker, signs):
      raise ValueError(
        f'{name}: these statistics are of another rotation (blocks'
        f' {marker.shape}, the rule gives {signs.shape}, or another'
        ' seed); calibrate with the same rules as quantize'
      )
    return stats
  if needs_abs:
    raise ValueError(
      f'{name}: the rule rotates this weight and needs max |x H| or mean'
      ' |x H| per channel (SVDQuant smoothing, L2QER, AWQ), which'
      ' unrotated statistics cannot give; calibrate under'
      ' LqerCalibrationProvider with the rotating rules (it rotates the'
      ' input before collecting)'
    )
  out = {
    k: v for k, v in stats.items() if k not in ('sum_of_abs', 'max_of_abs')
  }
  if 'sum_of_xtx' in stats:
    out['sum_of_xtx'] = rotation_lib.rotate_gram(stats['sum_of_xtx'], signs)
  if 'sample' in stats:
    out['sample'] = rotation_lib.rotate(stats['sample'], signs, -1)
  out[ROTATION_KEY] = jnp.asarray(signs)
  return out


def _check_stats(job: jobs.Job, base_needs):
  name = job.name
  needs = (
    f'method {job.rule.method!r}'
    if job.method_needs_stats
    else f'base {job.base_kind!r}'
  )
  if job.stats is None:
    raise ValueError(
      f'{name}: {needs} needs calibration statistics, but none were found'
      f' (looked for {name}{stats_lib.SUFFIX} in `calibration`). Run the'
      ' model under LqerCalibrationProvider with the same rules first.'
    )
  stats_lib.check(job.stats, job.layout, name)
  wants_xtx = (
    (job.has_factors and job.rule.method == 'qera')
    or (base_needs == 'sum_of_xtx')
    or (job.svdquant and job.rule.error_rank)
  )
  if job.svdquant and 'max_of_abs' not in job.stats:
    raise ValueError(
      f"{name}: method 'svdquant' needs max |x| per input channel"
      ' (max_of_abs), which these statistics lack; calibrate with this'
      ' version of LqerCalibrationProvider'
    )
  if wants_xtx and 'sum_of_xtx' not in job.stats:
    raise ValueError(
      f'{name}: {needs} needs E[x^T x] (sum_of_xtx), but these statistics'
      ' were collected with LqerCalibrationProvider(second_moment=False)'
    )
  if base_needs and len(job.layout.contracting_axes) != 1:
    raise ValueError(
      f'{name}: base {job.base_kind!r} supports kernels with'
      ' exactly one contracting axis; this one has layout'
      f' {job.layout}'
    )
