"""Running the offline pass's jobs: group -> base -> factor.

`lqer.params` plans one `Job` per weight. Same-shaped weights with the same
settings are grouped and cut into chunks of bounded bytes; each chunk gets
its bases (`lqer.bases`) and is factored in one jitted call
(`lqer.factor`), an RTN base fused into it. SVDQuant chunks are smoothed
and split first, their residuals quantized after (`_run_svdquant`).
"""

import dataclasses
import hashlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from qwix._src.core import qarray
from qwix._src.providers import ptq

from lqer import bases
from lqer import decompose
from lqer import factor
from lqer import layout as layout_lib
from lqer import stats as stats_lib
from lqer.rule import LqerRule
from lqer.weight import WithLqer
from lqer.weight import divide_along


@dataclasses.dataclass
class Job:
  """One weight to quantize: its base and, with a rank, factors (rank 0: a
  GPTQ / AWQ / stored base alone, or SVDQuant's smoothing alone)."""

  path: tuple[Any, ...]
  weight: jax.Array
  how: qarray.HowToQuantize
  layout: layout_lib.KernelLayout
  rule: LqerRule
  rank: int
  base: Callable[..., Any]
  base_kind: str
  stats: dict[str, jax.Array] | None = None

  @property
  def name(self) -> str:
    return path_str(self.path)

  @property
  def svdquant(self) -> bool:
    return self.rule.method == 'svdquant'

  @property
  def method_needs_stats(self) -> bool:
    return self.svdquant or bool(self.rank and self.rule.needs_calibration)


def path_str(path) -> str:
  return '/'.join(map(str, path))


def _group_key(job: Job):
  how, rule = job.how, job.rule
  return (
      job.weight.shape, str(job.weight.dtype), job.layout, job.rank,
      job.base_kind, rule.method, rule.solver, rule.oversample,
      rule.resolved_power_iters, rule.krylov, rule.qera_damping,
      rule.smooth_alpha, rule.error_rank,
      str(how.qtype), tuple(how.channelwise_axes),
      tuple(sorted(how.tiled_axes.items())), how.calibration_method,
  )


def _chunks(jobs, max_group_bytes):
  """Same-settings jobs, grouped and cut so a chunk holds <= max bytes."""
  groups: dict[Any, list[Job]] = {}
  for job in jobs:
    groups.setdefault(_group_key(job), []).append(job)
  for group in groups.values():
    per = 4 * math.prod(group[0].weight.shape)
    if group[0].rule.method == 'qera' or group[0].rule.error_rank:
      per += 4 * group[0].layout.in_size ** 2  # plus its Cholesky factor
    if group[0].svdquant:  # plus the residual
      per *= 2
    size = max(1, max_group_bytes // max(per, 1))
    for i in range(0, len(group), size):
      yield group[i:i + size]


def run(jobs, max_group_bytes, progress):
  """{path: quantized weight} for the planned jobs."""
  out = {}
  chunks = list(_chunks(jobs, max_group_bytes))
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    chunks = tqdm(chunks, desc='lqer', unit='group')
  factors = _CholeskyCache(max_group_bytes)
  for chunk in chunks:
    out.update(_run_chunk(chunk, factors))
  return out


class _CholeskyCache:
  """Damped Cholesky factors of E[x^T x], shared by weights that read the
  same input (q/k/v, gate/up): keyed by the statistics' content, evicted
  oldest-first beyond `max_bytes`."""

  def __init__(self, max_bytes):
    self._max_bytes = max_bytes
    self._factors: dict[bytes, jax.Array] = {}

  def get(self, job: Job) -> jax.Array:
    r = stats_lib.second_moment(job.stats)
    damping = job.rule.qera_damping
    key = hashlib.blake2b(np.asarray(r).tobytes() + repr(damping).encode(),
                          digest_size=16).digest()
    if key not in self._factors:
      chol = decompose.damped_cholesky(r, damping)
      if not bool(jnp.all(jnp.isfinite(chol))):
        raise ValueError(
            f'{job.name}: the Cholesky factorisation of E[x^T x] failed even'
            f' with damping {damping} x mean(diag); the statistics are not'
            ' positive semi-definite. Check the calibration data, or raise'
            ' LqerRule.qera_damping.')
      while self._factors and (sum(f.nbytes for f in self._factors.values())
                               + chol.nbytes > self._max_bytes):
        self._factors.pop(next(iter(self._factors)))
      self._factors[key] = chol
    return self._factors[key]


def _run_chunk(chunk: list[Job], factors: _CholeskyCache):
  """Bases of a chunk of same-settings weights, then their factors in one
  jitted call (an RTN base fused into it)."""
  first = chunk[0]
  rule, layout = first.rule, first.layout
  if first.svdquant:
    return _run_svdquant(chunk, factors)
  if first.base_kind == 'rtn':
    how, awq, based = first.how, [None] * len(chunk), None
    base = _stack([bases.rtn_scale(j.weight, j.how) for j in chunk])
  else:
    based = [job.base(job.weight, job.how, job.layout, job.stats)
             for job in chunk]
    if first.rank == 0:
      return {job.path: _base_only(job, q, s)
              for job, (q, s) in zip(chunk, based)}
    how, awq = None, [s for _, s in based]
    base = _stack([q for q, _ in based])
  extra = {}
  if rule.method == 'l2qer':
    extra['act_abs_mean'] = jnp.stack(
        [stats_lib.abs_mean(j.stats) for j in chunk])
  elif rule.method == 'qera':
    extra['chol'] = jnp.stack([factors.get(j) for j in chunk])
  qs, a, b = factor.factor_fn(layout, first.rank, rule, how)(
      jnp.stack([j.weight for j in chunk]), base,
      None if awq[0] is None else jnp.stack(awq),
      jnp.stack([factor.seed_key(rule, j.name) for j in chunk]), **extra)
  out = {}
  for i, job in enumerate(chunk):
    q = (based[i][0] if qs is None
         else jax.tree.map(lambda x, i=i: x[i], qs))
    ai, bi = _place_factors(job, *layout.split_factors(a[i], b[i]))
    out[job.path] = WithLqer.create(
        array=q, how=job.how, layout=layout, rule=rule, a=ai, b=bi,
        input_scale=awq[i], path=job.name)
  return out


def _stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def _run_svdquant(chunk: list[Job], factors: _CholeskyCache):
  """SVDQuant of a chunk: smoothing scales and SVD branch in one jitted
  call, the residual quantized by the base (on the smoothed statistics),
  and with error_rank, QERA of what is left, E = (R - deq(Q(R))) / lam,
  appended to the branch."""
  first = chunk[0]
  rule, layout = first.rule, first.layout
  keys = jnp.stack([factor.seed_key(rule, j.name) for j in chunk])
  a, b, residual, lam = factor.svdquant_fn(layout, first.rank, rule)(
      jnp.stack([j.weight for j in chunk]),
      jnp.stack([stats_lib.abs_max(j.stats) for j in chunk]), keys)
  qs = [job.base(residual[i], job.how, layout,
                 stats_lib.scaled(job.stats, lam[i]))[0]
        for i, job in enumerate(chunk)]
  if rule.error_rank:
    qera = dataclasses.replace(rule, method='qera', rank=rule.error_rank,
                               error_rank=0)
    keys2 = jax.vmap(jax.random.fold_in)(keys, jnp.ones(len(chunk),
                                                        jnp.uint32))
    _, a2, b2 = factor.factor_fn(layout, rule.error_rank, qera)(
        jax.vmap(lambda r, s: divide_along(r, s, layout.contracting_axes))(
            residual, lam),
        _stack(qs), lam, keys2,
        chol=jnp.stack([factors.get(j) for j in chunk]))
    a, b = jnp.concatenate([a, a2], -1), jnp.concatenate([b, b2], -2)
  out = {}
  for i, job in enumerate(chunk):
    ai, bi = _place_factors(job, *layout.split_factors(a[i], b[i]))
    out[job.path] = WithLqer.create(
        array=qs[i], how=job.how, layout=layout, rule=rule, a=ai, b=bi,
        input_scale=lam[i], path=job.name)
  return out


def _place_factors(job: Job, a, b):
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


def _base_only(job: Job, q, input_scale):
  """A base without factors: a plain WithAux, or a rank-0 WithLqer that
  keeps an AWQ scale."""
  if input_scale is None:
    return ptq.WithAux(q, job.how)
  layout = job.layout
  zeros = jnp.zeros((), jnp.float32)
  return WithLqer.create(
      array=q, how=job.how, layout=layout, rule=job.rule,
      a=jnp.broadcast_to(zeros, layout.a_shape(0)),
      b=jnp.broadcast_to(zeros, layout.b_shape(0)), input_scale=input_scale,
      path=job.name)
