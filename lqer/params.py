"""`lqer_quantize_params`: the offline pass from float params to LQER params.

For every weight whose rule has a rank: quantize it exactly as Qwix PTQ would
(or take a GPTQ / AWQ base), take E = W - base, reshape it to the
(*batch, in, out) matrix the op multiplies (`lqer.layout`), factor it with the
rule's method (`lqer.decompose`) and store a `WithLqer`. Weights matched
without a rank go through `qwix.quantize_params`; everything else passes
through. Same-shaped weights with the same settings are stacked and go
through one jitted call, a bounded number of bytes at a time.
"""

import dataclasses
import hashlib
import math
import re
import warnings
import zlib
from typing import Any, Sequence

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util
from qwix.contrib import awq_core
from qwix.contrib import calibration as qwix_calibration
from qwix.contrib import gptq_core

from lqer import decompose
from lqer import layout as layout_lib
from lqer import stats as stats_lib
from lqer.rule import LqerRule
from lqer.weight import WithLqer

BASES = ('rtn', 'gptq', 'awq')


@dataclasses.dataclass
class _Job:
  """One weight to reconstruct."""

  path: tuple[Any, ...]
  weight: jax.Array
  how: qarray.HowToQuantize
  layout: layout_lib.KernelLayout
  rule: LqerRule
  rank: int
  abs_param: Any
  stats: dict[str, jax.Array] | None = None


def path_str(path) -> str:
  return '/'.join(map(str, path))


def match_rule(rules: Sequence[qwix.QuantizationRule], path):
  """First rule whose module_path fully matches the param's module path."""
  module_path = path_str(path[:-1])
  for rule in rules:
    if re.fullmatch(rule.module_path, module_path):
      return rule
  return None


def lqer_quantize_params(
    params: Any,
    abstract_params: Any,
    rules: Sequence[qwix.QuantizationRule] | None = None,
    *,
    calibration: Any = None,
    base: str = 'rtn',
    allow_extra_params: bool = False,
    max_group_bytes: int = 1 << 30,
    progress: bool = False,
) -> Any:
  """Quantizes a float param tree into LQER params.

  Args:
    params: float params, unboxed (Linen) or `nnx.to_pure_dict` (NNX). May be
      a subtree of the model's params, as with `qwix.quantize_params`.
    abstract_params: the tree from `LqerProvider` (each reconstructed weight
      an abstract `WithLqer` carrying its rule) or, with `rules`, from
      `qwix.PtqProvider` (plain `WithAux`). For NNX, the abstract model.
    rules: needed only with a PtqProvider abstract tree: the `LqerRule`s whose
      rank decides which weights get factors (first match by module path).
    calibration: the `quant_stats` collection from `LqerCalibrationProvider`;
      required for methods 'l2qer' and 'qera' and for bases 'gptq' / 'awq'.
    base: the quantizer whose error is reconstructed: 'rtn' (Qwix PTQ,
      round to nearest), 'gptq' or 'awq' (qwix.contrib, driven by the same
      statistics).
    allow_extra_params: as in `qwix.quantize_params`.
    max_group_bytes: float bytes of weights stacked into one jitted call.
    progress: show a progress bar over weight groups.

  Returns:
    The quantized params, same structure as `params` (a pure dict for NNX).
  """
  if base not in BASES:
    raise ValueError(f'base must be one of {BASES}, got {base!r}')
  jobs, plain = _plan(params, abstract_params, rules, calibration, base,
                      allow_extra_params)
  out = _run_jobs(jobs, base, max_group_bytes, progress)
  ptq_out = ptq.quantize_params(
      flax.traverse_util.unflatten_dict(plain), abstract_params,
      allow_extra_params=allow_extra_params,
  ) if plain else {}
  if isinstance(abstract_params, nnx.Module) and out:
    # As qwix.quantize_params: WithLqer -> pure dicts that nnx.update takes.
    out = flax.traverse_util.flatten_dict(flax.traverse_util.unflatten_dict(
        nnx.to_pure_dict(nnx.state(out))))
  out.update(flax.traverse_util.flatten_dict(ptq_out))
  return flax.traverse_util.unflatten_dict(out)


def _plan(params, abstract_params, rules, calibration, base,
          allow_extra_params):
  """Splits params into LQER jobs and the rest, validating every job."""
  jobs, plain = [], {}
  for path, w in flax.traverse_util.flatten_dict(params).items():
    abs_w = flax_util.get_value_from_path(abstract_params, path)
    if isinstance(abs_w, nnx.Variable):
      abs_w = abs_w.get_value()
    job = _make_job(path, w, abs_w, rules, base)
    if job is None:
      if abs_w is None and allow_extra_params:
        continue
      plain[path] = w
      continue
    _check_weight(job)
    if job.rule.needs_calibration or base != 'rtn':
      job.stats = stats_lib.lookup(calibration, path)
      _check_stats(job, base)
    jobs.append(job)
  return jobs, plain


def _make_job(path, w, abs_w, rules, base):
  """A `_Job` if this weight needs more than plain Qwix PTQ, else None.

  Rank 0 marks a weight that gets a GPTQ / AWQ base without factors.
  """
  if isinstance(abs_w, WithLqer):
    rule, layout, rank = abs_w.rule, abs_w.layout, abs_w.rank
  elif isinstance(abs_w, ptq.WithAux):
    layout = layout_lib.KernelLayout.from_channelwise_axes(
        abs_w.shape, abs_w.how.channelwise_axes)
    rule = match_rule(rules, path) if rules is not None else None
    if not isinstance(rule, LqerRule) or rule.rank is None:
      if base == 'rtn':
        return None
      rule, rank = LqerRule(weight_qtype=abs_w.how.qtype), 0
    else:
      rank = rule.rank
    if rank > layout.max_rank:
      # The earlier project's flow clipped silently; keep it running, loudly.
      warnings.warn(
          f'{path_str(path)}: rank {rank} is larger than the'
          f' {layout.in_size} x {layout.out_size} matrix allows; using rank'
          f' {layout.max_rank} (only with rules + a PtqProvider tree;'
          ' LqerProvider raises)', stacklevel=4)
      rank = layout.max_rank
  else:
    return None
  if not isinstance(w, jax.Array | np.ndarray):
    raise TypeError(f'{path_str(path)}: params must be a pure dict of arrays,'
                    f' got {type(w).__name__}')
  w = jnp.asarray(w).reshape(abs_w.shape)
  return _Job(path, w, abs_w.how, layout, rule, rank, abs_w)


def build_weight(path, w, how, layout, rule: LqerRule) -> WithLqer:
  """One `WithLqer` from a float weight, as the provider needs at init.

  'svd' factors are computed; methods that need calibration get zero
  factors until `lqer_quantize_params` is run with statistics.
  """
  job = _Job(path, w, how, layout, rule, rule.rank, None)
  if not rule.needs_calibration:
    return _run_chunk([job], 'rtn')[path]
  zeros = jnp.zeros((), rule.factor_dtype)
  return WithLqer(
      array=qarray.quantize(w, how), how=how,
      a=jnp.broadcast_to(zeros, layout.a_shape(rule.rank)),
      b=jnp.broadcast_to(zeros, layout.b_shape(rule.rank)),
      contracting_axes=layout.contracting_axes,
      batch_axes=layout.batch_axes, rule=rule,
  )


def _check_weight(job: _Job):
  name = path_str(job.path)
  job.layout.check_rank(job.rank, name)
  if not jnp.issubdtype(job.weight.dtype, jnp.floating):
    raise TypeError(f'{name}: expected a float weight, got {job.weight.dtype}')
  if not bool(jnp.all(jnp.isfinite(job.weight))):
    bad = int(jnp.sum(~jnp.isfinite(job.weight)))
    raise ValueError(f'{name}: weight holds {bad} NaN/Inf values')


def _check_stats(job: _Job, base: str):
  name = path_str(job.path)
  needs = f"method {job.rule.method!r}" if job.rule.needs_calibration else (
      f"base {base!r}")
  if job.stats is None:
    raise ValueError(
        f'{name}: {needs} needs calibration statistics, but none were found'
        f' (looked for {name}{stats_lib.SUFFIX} in `calibration`). Run the'
        ' model under LqerCalibrationProvider with the same rules first.'
    )
  stats_lib.check(job.stats, job.layout, name)
  if ((job.rank and job.rule.method == 'qera') or base == 'gptq') and (
      'sum_of_xtx' not in job.stats):
    raise ValueError(
        f'{name}: {needs if base != "gptq" else "base gptq"} needs E[x^T x]'
        ' (sum_of_xtx), but these statistics were collected with'
        ' LqerCalibrationProvider(second_moment=False)')
  if base != 'rtn' and (job.layout.batch_axes
                        or len(job.layout.contracting_axes) != 1):
    raise ValueError(f'{name}: base {base!r} supports kernels with exactly'
                     f' one contracting axis; this one has layout'
                     f' {job.layout}')


def _group_key(job: _Job):
  how = job.how
  return (
      job.weight.shape, str(job.weight.dtype), job.layout, job.rank,
      job.rule.method, job.rule.solver, job.rule.oversample,
      job.rule.resolved_power_iters, job.rule.krylov, job.rule.qera_damping,
      str(how.qtype),
      tuple(how.channelwise_axes), tuple(sorted(how.tiled_axes.items())),
      how.calibration_method,
  )


def _chunks(jobs, max_group_bytes):
  """Same-settings jobs, grouped and cut so a chunk holds <= max bytes."""
  groups: dict[Any, list[_Job]] = {}
  for job in jobs:
    groups.setdefault(_group_key(job), []).append(job)
  for group in groups.values():
    per = 4 * math.prod(group[0].weight.shape)
    if group[0].rule.method == 'qera':  # plus its Cholesky factor
      per += 4 * group[0].layout.in_size ** 2
    size = max(1, max_group_bytes // max(per, 1))
    for i in range(0, len(group), size):
      yield group[i:i + size]


def _run_jobs(jobs, base, max_group_bytes, progress):
  out = {}
  chunks = list(_chunks(jobs, max_group_bytes))
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    chunks = tqdm(chunks, desc='lqer', unit='group')
  factors = _CholeskyCache(max_group_bytes)
  for chunk in chunks:
    out.update(_run_chunk(chunk, base, factors))
  return out


class _CholeskyCache:
  """Damped Cholesky factors of E[x^T x], shared by weights that read the
  same input (q/k/v, gate/up): keyed by the statistics' content, evicted
  oldest-first beyond `max_bytes`."""

  def __init__(self, max_bytes):
    self._max_bytes = max_bytes
    self._factors: dict[bytes, jax.Array] = {}

  def get(self, job: _Job) -> jax.Array:
    r = stats_lib.second_moment(job.stats)
    damping = job.rule.qera_damping
    key = hashlib.blake2b(np.asarray(r).tobytes() + repr(damping).encode(),
                          digest_size=16).digest()
    if key not in self._factors:
      chol = decompose.damped_cholesky(r, damping)
      if not bool(jnp.all(jnp.isfinite(chol))):
        raise ValueError(
            f'{path_str(job.path)}: the Cholesky factorisation of E[x^T x]'
            f' failed even with damping {damping} x mean(diag); the'
            ' statistics are not positive semi-definite. Check the'
            ' calibration data, or raise LqerRule.qera_damping.')
      while self._factors and (sum(f.nbytes for f in self._factors.values())
                               + chol.nbytes > self._max_bytes):
        self._factors.pop(next(iter(self._factors)))
      self._factors[key] = chol
    return self._factors[key]


def _base_one(job: _Job, base: str):
  """(QArray, dequantized base weight, awq_scale or None) of one weight
  with a GPTQ or AWQ base ('rtn' is quantized inside `_factor_fn`)."""
  axis = job.layout.contracting_axes[0]
  w_norm, restore = qwix_calibration.normalize_weight(job.weight, axis)
  how = dataclasses.replace(job.how, channelwise_axes=[0])
  if axis in how.tiled_axes:
    how = dataclasses.replace(how, tiled_axes={1: how.tiled_axes[axis]})
  if base == 'gptq':
    q = gptq_core.quantize_weight(
        w_norm, stats_lib.second_moment(job.stats), how)[0]
    q = restore(q)
    return q, qarray.dequantize(q), None
  q, scales = awq_core.quantize_weight(
      w_norm, stats_lib.abs_mean(job.stats), how)
  q = restore(q)
  awq_scale = scales.reshape(-1)
  shape = [1] * job.weight.ndim
  shape[axis] = awq_scale.shape[0]
  return q, qarray.dequantize(q) / awq_scale.reshape(shape), awq_scale


def _run_chunk(chunk: list[_Job], base: str, factors=None):
  """Quantizes and factors a chunk of same-settings weights in one call.

  With base 'rtn' the quantization runs inside the jitted call (Qwix PTQ's
  own `quantize`, bit for bit); GPTQ / AWQ bases are computed eagerly first.
  """
  first = chunk[0]
  rule, layout = first.rule, first.layout
  if base == 'rtn':
    # Qwix's calibration, eagerly: jitted, XLA may fold e.g. the clipping
    # factor of 'absmax,0.9' into the scale differently (1-ulp changes).
    scales = [qarray.compute_scale_zero_point(
        qarray.calibrate(j.weight, j.how), j.how.qtype) for j in chunk]
    bases = jax.tree.map(lambda *x: jnp.stack(x), *scales)
    awq = [None] * len(chunk)
  else:
    results = [_base_one(j, base) for j in chunk]
    if first.rank == 0:
      return {job.path: _base_only(job, q, s) for job, (q, _, s)
              in zip(chunk, results)}
    qs = [r[0] for r in results]
    bases = jnp.stack([r[1] for r in results])
    awq = [r[2] for r in results]
  ws = jnp.stack([j.weight for j in chunk])
  extra = {}
  if rule.method == 'l2qer':
    extra['act_abs_mean'] = jnp.stack(
        [stats_lib.abs_mean(j.stats) for j in chunk])
  elif rule.method == 'qera':
    extra['chol'] = jnp.stack([factors.get(j) for j in chunk])
  keys = jnp.stack([
      jax.random.fold_in(jax.random.key(rule.seed),
                         zlib.crc32(path_str(j.path).encode()))
      for j in chunk
  ])
  q, a, b = _factor_fn(layout, first.rank, rule,
                       first.how if base == 'rtn' else None)(
                           ws, bases, keys, **extra)
  del ws, bases
  if q is not None:
    qs = [jax.tree.map(lambda x, i=i: x[i], q) for i in range(len(chunk))]
  out = {}
  for i, job in enumerate(chunk):
    ai, bi = _place_factors(job, *layout.split_factors(a[i], b[i]))
    out[job.path] = WithLqer(
        array=qs[i], how=job.how,
        a=ai.astype(rule.factor_dtype), b=bi.astype(rule.factor_dtype),
        awq_scale=awq[i], contracting_axes=layout.contracting_axes,
        batch_axes=layout.batch_axes, rule=rule,
    )
  return out


def _place_factors(job: _Job, a, b):
  """Shards A like W's batch + contracting axes and B like its batch +
  output axes (the rank axis replicated), when W carries a NamedSharding."""
  sharding = getattr(job.weight, 'sharding', None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return a, b
  spec = tuple(sharding.spec) + (None,) * (job.weight.ndim - len(sharding.spec))
  layout = job.layout
  a_spec = [spec[x] for x in (*layout.batch_axes, *layout.contracting_axes)]
  b_spec = [spec[x] for x in layout.batch_axes] + [None] + [
      spec[x] for x in layout.output_axes]
  named = lambda s: jax.sharding.NamedSharding(sharding.mesh,
                                                jax.sharding.PartitionSpec(*s))
  return (jax.device_put(a, named(a_spec + [None])),
          jax.device_put(b, named(b_spec)))


def _base_only(job: _Job, q, awq_scale):
  """GPTQ base: a plain WithAux; AWQ base: a rank-0 WithLqer keeps s."""
  if awq_scale is None:
    return ptq.WithAux(q, job.how)
  layout = job.layout
  dtype = job.rule.factor_dtype
  return WithLqer(
      array=q, how=job.how, a=jnp.zeros(layout.a_shape(0), dtype),
      b=jnp.zeros(layout.b_shape(0), dtype), awq_scale=awq_scale,
      contracting_axes=layout.contracting_axes, batch_axes=layout.batch_axes,
      rule=job.rule)


_FACTOR_FNS: dict[Any, Any] = {}


def _factor_fn(layout, rank, rule: LqerRule, how=None):
  """Jitted (ws, base, keys, stats) -> (QArrays or None, A, B), stacked.

  base: the dequantized base weights, or with `how` (base 'rtn') Qwix's
  (scale, zero_point) per weight: each w is then quantized inside, q =
  quantize_with_scale_zero_point(w), E = w - dequantize(q), so no float
  dequantized weight leaves the call. Cached by the settings
  (HowToQuantize is unhashable, so by its repr).
  """
  solver_kw = dict(solver=rule.solver, oversample=rule.oversample,
                   power_iters=rule.resolved_power_iters, krylov=rule.krylov)
  cache_key = (layout, rank, rule.method, tuple(solver_kw.items()),
               repr(how))
  if cache_key in _FACTOR_FNS:
    return _FACTOR_FNS[cache_key]

  def one(w, base, key, act_abs_mean=None, chol=None):
    q, deq = None, base
    if how is not None:
      q = qarray.quantize_with_scale_zero_point(w, how.qtype, *base,
                                                how.noise_fn)
      deq = qarray.dequantize(q)
    error = layout.to_matrix(w.astype(jnp.float32) - deq.astype(jnp.float32))
    a, b = decompose.reconstruct(
        error, rank, rule.method, act_abs_mean=act_abs_mean, chol=chol,
        key=key, **solver_kw)
    return q, a, b

  fn = jax.jit(jax.vmap(one))
  _FACTOR_FNS[cache_key] = fn
  return fn
