"""Running the offline pass's jobs: group -> base -> factor.

`lqer.offline.params` plans one `Job` per weight. Same-shaped weights with the
same
settings are grouped and cut into chunks of bounded bytes; each chunk gets
its bases (`lqer.quant.bases`) and is factored in one jitted call
(`lqer.quant.factor`), an RTN base fused into it. SVDQuant chunks are smoothed
and split first, their residuals quantized after (`_run_svdquant`).
"""

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lqer import _qwix
from lqer.core import decompose
from lqer.core import layout as layout_lib
from lqer.core.paths import path_str
from lqer.offline import allocation
from lqer.quant import bases
from lqer.quant import factor
from lqer.quant import stats as stats_lib
from lqer.quant.rule import LqerRule
from lqer.quant.weight import WithLqer
from lqer.quant.weight import divide_along
from lqer.quant.weight import rotate_along


@dataclasses.dataclass
class Job:
  """One weight to quantize: its base and, with a rank, factors (rank 0: a
  GPTQ / AWQ / stored base alone, SVDQuant's smoothing alone, or a rotated
  base). With `rotation` (the rule's signs), `weight` and `stats` are
  already the rotated Hᵀ W and the statistics of x H (`lqer.offline.params`
  rotates them), and the `WithLqer` stores the signs."""

  path: tuple[Any, ...]
  weight: jax.Array
  how: _qwix.HowToQuantize
  layout: layout_lib.KernelLayout
  rule: LqerRule
  rank: int
  base: Callable[..., Any]
  base_kind: str
  stats: dict[str, jax.Array] | None = None
  rotation: Any = None

  @property
  def name(self) -> str:
    return path_str(self.path)

  @property
  def svdquant(self) -> bool:
    return self.rule.method == 'svdquant' and self.rule.rank is not None

  @property
  def has_factors(self) -> bool:
    return bool(self.rank) or self.rule.auto_rank

  @property
  def method_needs_stats(self) -> bool:
    return self.svdquant or (self.has_factors and self.rule.needs_calibration)


def _group_key(job: Job):
  how, rule = job.how, job.rule
  return (
    job.weight.shape,
    str(job.weight.dtype),
    job.layout,
    job.rank,
    job.base_kind,
    rule.method,
    rule.solver,
    rule.oversample,
    rule.resolved_power_iters,
    rule.krylov,
    rule.qera_damping,
    rule.smooth_alpha,
    rule.error_rank,
    str(how.qtype),
    tuple(how.channelwise_axes),
    tuple(sorted(how.tiled_axes.items())),
    how.calibration_method,
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
    if group[0].base_kind == 'gptq':
      per += 4 * group[0].layout.in_size ** 2  # plus its Hessian
    if group[0].svdquant:  # plus the residual
      per *= 2
    size = max(1, max_group_bytes // max(per, 1))
    for i in range(0, len(group), size):
      yield group[i : i + size]


def run_jobs(jobs, max_group_bytes, progress, allocator=None):
  """{path: quantized weight} for the planned jobs.

  allocator: an `allocation.Allocator` when some rules have rank 'auto':
  those weights are factored at their largest rank first, then cut to the
  ranks it allocates (and quantized, with factor_qtype).
  """
  if allocator is not None:
    allocator.set_max_ranks(jobs)
  out, auto = {}, {}
  chunks = list(_chunks(jobs, max_group_bytes))
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    chunks = tqdm(chunks, desc='lqer', unit='group')
  factors = _CholeskyCache(max_group_bytes)
  for chunk in chunks:
    if chunk[0].rule.auto_rank:
      auto.update(_fit_auto(chunk, factors))
    else:
      out.update(_run_chunk(chunk, factors))
  if auto:
    out.update(_allocated(jobs, auto, allocator, max_group_bytes, factors))
  return out


def _allocated(jobs, fits, allocator, max_group_bytes, factors):
  """The 'auto' weights cut to the allocator's ranks. With a probe: ranks
  from the damage measured on each weight's own factors, and of the
  candidates between them and the uniform rank (`Allocator.candidates`), the
  one whose weights move the probed output least (the other weights float)."""
  jobs = [j for j in jobs if j.path in fits]
  if allocator.probe is not None:
    allocator.measure(
      {
        j.path: _errors_left(j, fits[j.path], allocator.probe_ranks(j))
        for j in jobs
      }
    )
  ranks = allocator.allocate(
    {p: (f.gains, f.energy, f.damage_gains) for p, f in fits.items()}
  )
  cut = lambda ranks: {
    path: w
    for chunk in _chunks(jobs, max_group_bytes)
    for path, w in _cut_auto(chunk, fits, ranks, factors).items()
  }
  if allocator.probe is None:
    return cut(ranks)
  best, distances = None, []
  for option in allocator.candidates(
    ranks
  ):  # one candidate's weights at a time
    weights = cut(option)
    distances.append(
      allocator.probe.distance(
        allocator.params, {p: w.reconstructed() for p, w in weights.items()}
      )
    )
    if best is None or distances[-1] < min(distances[:-1]):
      best = option, weights  # ties keep the earlier (more allocated)
  allocator.choose(best[0], distances)
  return best[1]


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
    key = hashlib.blake2b(
      np.asarray(r).tobytes() + repr(damping).encode(), digest_size=16
    ).digest()
    if key not in self._factors:
      chol = decompose.damped_cholesky(r, damping)
      if not bool(jnp.all(jnp.isfinite(chol))):
        raise ValueError(
          f'{job.name}: the Cholesky factorisation of E[x^T x] failed even'
          f' with damping {damping} x mean(diag); the statistics are not'
          ' positive semi-definite. Check the calibration data, or raise'
          ' LqerRule.qera_damping.'
        )
      while self._factors and (
        sum(f.nbytes for f in self._factors.values()) + chol.nbytes
        > self._max_bytes
      ):
        self._factors.pop(next(iter(self._factors)))
      self._factors[key] = chol
    return self._factors[key]


@dataclasses.dataclass
class _Fit:
  """A chunk's (or one weight's) base and factors: qs the QArrays, A
  (*, in, k) and B (*, k, out) in matrix form, float or integer values with
  their scales (`decompose.quantize_factors`); gains / energy for 'auto'."""

  qs: Any
  input_scales: jax.Array | None
  a: jax.Array
  b: jax.Array
  a_scale: jax.Array | None = None
  b_scale: jax.Array | None = None
  gains: np.ndarray | None = None
  energy: tuple[float, float] | None = None  # ||T W||^2, ||T E||^2
  damage_gains: np.ndarray | None = None

  def dequantized(self):
    if self.a_scale is None:
      return self.a, self.b
    return self.a * self.a_scale, self.b * self.b_scale

  def take(self, i):
    """The i-th weight's fit of a chunk's."""
    return _Fit(
      *_take(
        (
          self.qs,
          self.input_scales,
          self.a,
          self.b,
          self.a_scale,
          self.b_scale,
        ),
        i,
      )
    )


def _method_stats(chunk: list[Job], factors: _CholeskyCache):
  """The method's statistics, stacked: mean |x| (l2qer), Cholesky (qera)."""
  method = chunk[0].rule.method
  if method == 'l2qer':
    return {
      'act_abs_mean': jnp.stack([stats_lib.abs_mean(j.stats) for j in chunk])
    }
  if method == 'qera':
    return {'chol': jnp.stack([factors.get(j) for j in chunk])}
  return {}


def _first_fit(chunk: list[Job], ws, extra) -> _Fit:
  """Bases of a chunk of same-settings weights ws (stacked), then their
  float factors in one jitted call (an RTN base fused into it)."""
  first = chunk[0]
  keys = jnp.stack([factor.seed_key(first.rule, j.name) for j in chunk])
  if first.base_kind == 'rtn':
    how, scales = first.how, None
    base = _stack([bases.rtn_scale(j.weight, j.how) for j in chunk])
  else:
    how, base, scales = None, *_bases(chunk, [j.weight for j in chunk])
  qs, a, b = factor.factor_fn(first.layout, first.rank, first.rule, how)(
    ws, base, scales, keys, **extra
  )
  return _Fit(base if qs is None else qs, scales, a, b)


def _bases(chunk: list[Job], targets):
  """(stacked QArrays, stacked input scales or None) of each job's base of
  its target (the weight, or W - A B when refining)."""
  first = chunk[0]
  if first.base_kind == 'rtn':
    return bases.rtn_stacked(jnp.stack(list(targets)), first.how), None
  if first.base_kind == 'gptq':  # one vmapped GPTQ for the chunk
    return bases.gptq_stacked(
      list(targets), first.how, first.layout, [j.stats for j in chunk]
    )
  based = [
    job.base(t, job.how, job.layout, job.stats)
    for job, t in zip(chunk, targets)
  ]
  scales = [s for _, s in based]
  return (
    _stack([q for q, _ in based]),
    None if scales[0] is None else jnp.stack(scales),
  )


def _quantized(chunk: list[Job], ws, fit: _Fit, extra, keep=None) -> _Fit:
  """fit with its factors quantized when the rule says so (columns where
  keep is False cut)."""
  rule, layout = chunk[0].rule, chunk[0].layout
  if rule.factor_qtype is None:
    return fit
  if keep is None:
    keep = jnp.ones((len(chunk), fit.a.shape[-1]), bool)
  qa, sa, qb, sb = factor.quantize_fn(layout, rule)(
    ws, fit.qs, fit.input_scales, fit.a, keep, **extra
  )
  return dataclasses.replace(fit, a=qa, b=qb, a_scale=sa, b_scale=sb)


def _refined(chunk: list[Job], ws, fit: _Fit, extra) -> _Fit:
  """LoftQ-style refinement: Q_t = base(W - A B), A B refitted to its error;
  each weight keeps a step only if the method's objective ||T (W - Q - A B)||
  decreases, so it never increases."""
  first = chunk[0]
  layout, rule = first.layout, first.rule
  keys = jnp.stack([factor.seed_key(rule, j.name) for j in chunk])
  objective = factor.objective_fn(layout, rule)
  best = objective(ws, fit.qs, fit.input_scales, *fit.dequantized(), **extra)
  for _ in range(rule.refine_iters):
    branch = jnp.matmul(*fit.dequantized(), precision=jax.lax.Precision.HIGHEST)
    targets = ws - jax.vmap(layout.from_matrix)(branch)
    qs, scales = _bases(chunk, list(targets))
    _, a, b = factor.factor_fn(layout, first.rank, rule)(
      ws, qs, scales, keys, **extra
    )
    new = _quantized(chunk, ws, _Fit(qs, scales, a, b), extra)
    value = objective(ws, qs, scales, *new.dequantized(), **extra)
    better = value < best
    pick = lambda n, o: jnp.where(  # pylint: disable=cell-var-from-loop
      better.reshape((-1,) + (1,) * (n.ndim - 1)), n, o
    )
    fit = _Fit(
      *[
        jax.tree.map(pick, getattr(new, f.name), getattr(fit, f.name))
        for f in dataclasses.fields(_Fit)[:6]
      ]
    )
    best = jnp.minimum(value, best)
  return fit


def _run_chunk(chunk: list[Job], factors: _CholeskyCache):
  """A chunk of fixed-rank weights: bases, factors, quantized factors,
  refinement."""
  first = chunk[0]
  if first.svdquant:
    return _run_svdquant(chunk, factors)
  if first.rank == 0:
    qs, scales = _bases(chunk, [j.weight for j in chunk])
    return {
      job.path: _base_only(
        job,
        jax.tree.map(lambda x, i=i: x[i], qs),
        None if scales is None else scales[i],
      )
      for i, job in enumerate(chunk)
    }
  extra = _method_stats(chunk, factors)
  ws = jnp.stack([j.weight for j in chunk])
  fit = _quantized(chunk, ws, _first_fit(chunk, ws, extra), extra)
  if first.rule.refine_iters:
    fit = _refined(chunk, ws, fit, extra)
  return {job.path: _weight(job, fit.take(i)) for i, job in enumerate(chunk)}


def _fit_auto(chunk: list[Job], factors: _CholeskyCache):
  """Float factors at the largest rank, and each component's gain."""
  extra = _method_stats(chunk, factors)
  ws = jnp.stack([j.weight for j in chunk])
  fit = _first_fit(chunk, ws, extra)
  gains, out, err = factor.energy_fn(chunk[0].layout, chunk[0].rule)(
    ws, fit.qs, fit.input_scales, fit.a, **extra
  )
  return {
    job.path: dataclasses.replace(
      fit.take(i),
      gains=np.asarray(gains[i]),
      energy=(float(out[i]), float(err[i])),
      damage_gains=allocation.damage_gains(
        np.asarray(gains[i]), fit.b[i], job.stats
      ),
    )
    for i, job in enumerate(chunk)
  }


def _errors_left(job: Job, fit: _Fit, ranks):
  """(ranks, (K, *W.shape)): the error W - Q - A_:r B_:r left at each rank,
  in the kernel's layout (what `Budget.measure` probes); of a rotated
  weight, H (Hᵀ W - Q - A_:r B_:r), in the float model's basis."""
  e = factor.base_error(job.layout, job.weight, fit.qs, fit.input_scales)
  left = [
    e
    - jnp.matmul(
      fit.a[..., :r], fit.b[..., :r, :], precision=jax.lax.Precision.HIGHEST
    )
    for r in ranks
  ]
  kernels = [job.layout.from_matrix(x) for x in left]
  if job.rotation is not None:
    kernels = [
      rotate_along(k, job.rotation, job.layout.contracting_axes, True)
      for k in kernels
    ]
  return ranks, jnp.stack(kernels)


def _cut_auto(chunk: list[Job], fits, ranks, factors: _CholeskyCache):
  """Weights of rank 'auto' cut to their allocated ranks (and quantized)."""
  # The chunk's largest allocated rank, rounded up to 8 (fewer programs to
  # compile): the columns beyond it are cut from every weight of the chunk.
  top = max(ranks[j.path] for j in chunk)
  rank = min(chunk[0].rank, max(8, -(-top // 8) * 8))
  fit = _Fit(
    *[
      None if x[0] is None else _stack(x)
      for x in zip(
        *[
          (
            fits[j.path].qs,
            fits[j.path].input_scales,
            fits[j.path].a,
            fits[j.path].b,
          )
          for j in chunk
        ]
      )
    ]
  )
  fit = dataclasses.replace(fit, a=fit.a[..., :rank], b=fit.b[..., :rank, :])
  keep = (
    jnp.arange(rank)[None, :]
    < jnp.asarray([ranks[j.path] for j in chunk])[:, None]
  )
  fit = _quantized(
    chunk,
    jnp.stack([j.weight for j in chunk]),
    fit,
    _method_stats(chunk, factors),
    keep,
  )
  rule = chunk[0].rule
  stored = _stored(
    fit.a,
    fit.b,
    fit.a_scale,
    fit.b_scale,
    dtype=jnp.dtype(rule.factor_qtype or rule.factor_dtype),
    scale_dtype=jnp.dtype(rule.factor_dtype),
  )
  if all(x is None or x.is_fully_addressable for x in stored):
    stored = jax.device_get(stored)  # slicing on the host compiles nothing
  out = {}
  for i, job in enumerate(chunk):
    k = ranks[job.path]
    qs, input_scales = _take((fit.qs, fit.input_scales), i)
    a, b, a_scale, b_scale = (None if x is None else x[i] for x in stored)
    out[job.path] = _weight(
      job,
      _Fit(
        qs,
        input_scales,
        jnp.asarray(a[..., :k]),
        jnp.asarray(b[..., :k, :]),
        None if a_scale is None else jnp.asarray(a_scale[..., :k]),
        None if b_scale is None else jnp.asarray(b_scale[..., :k, :]),
      ),
    )
  return out


@functools.partial(jax.jit, static_argnames=('dtype', 'scale_dtype'))
def _stored(a, b, a_scale, b_scale, *, dtype, scale_dtype):
  """A chunk's factors A (n, ..., in, r), B (n, ..., r, out) and their
  scales in the dtypes they are stored in (one compiled call per chunk)."""
  cast = lambda x, d: None if x is None else x.astype(d)
  return (
    cast(a, dtype),
    cast(b, dtype),
    cast(a_scale, scale_dtype),
    cast(b_scale, scale_dtype),
  )


def _weight(job: Job, fit: _Fit) -> WithLqer:
  """One weight's `WithLqer` from its fit (factors placed like W)."""
  layout = job.layout
  a, b = layout.split_factors(fit.a, fit.b)
  a_scale = b_scale = None
  if fit.a_scale is not None:
    a_scale, b_scale = layout.split_scales(fit.a_scale, fit.b_scale)
  a, b, a_scale, b_scale = factor.place_factors(
    getattr(job.weight, 'sharding', None), job.layout, a, b, a_scale, b_scale
  )
  return WithLqer.create(
    array=fit.qs,
    how=job.how,
    layout=layout,
    rule=job.rule,
    a=a,
    b=b,
    a_scale=a_scale,
    b_scale=b_scale,
    input_scale=fit.input_scales,
    rotation=job.rotation,
    path=job.name,
  )


@jax.jit
def _take(arrays, i):
  """Entry i of every stacked array (one compiled call per chunk shape)."""
  return jax.tree.map(lambda x: x[i], arrays)


@jax.jit
def _stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def _run_svdquant(chunk: list[Job], factors: _CholeskyCache):
  """SVDQuant of a chunk: smoothing scales and SVD branch in one jitted
  call (quantized first with factor_qtype), the residual quantized by the
  base (on the smoothed statistics), and with error_rank, QERA of what is
  left, E = (R - deq(Q(R))) / lam, appended to the branch."""
  first = chunk[0]
  rule, layout = first.rule, first.layout
  keys = jnp.stack([factor.seed_key(rule, j.name) for j in chunk])
  a, b, residual, lam, scales = factor.svdquant_fn(layout, first.rank, rule)(
    jnp.stack([j.weight for j in chunk]),
    jnp.stack([stats_lib.abs_max(j.stats) for j in chunk]),
    keys,
  )
  qs = _stack(
    [
      job.base(
        residual[i], job.how, layout, stats_lib.scaled(job.stats, lam[i])
      )[0]
      for i, job in enumerate(chunk)
    ]
  )
  fit = _Fit(qs, lam, a, b, *(scales or (None, None)))
  if rule.factor_qtype is not None and not first.rank:
    fit = dataclasses.replace(
      fit,
      a_scale=jnp.ones((*a.shape[:-2], 1, 0)),
      b_scale=jnp.ones((*b.shape[:-1], 1)),
    )
  if rule.error_rank:
    qera = dataclasses.replace(
      rule, method='qera', rank=rule.error_rank, error_rank=0
    )
    keys2 = jax.vmap(jax.random.fold_in)(keys, jnp.ones(len(chunk), jnp.uint32))
    errors = jax.vmap(lambda r, s: divide_along(r, s, layout.contracting_axes))(
      residual, lam
    )
    extra = {'chol': jnp.stack([factors.get(j) for j in chunk])}
    _, a2, b2 = factor.factor_fn(layout, rule.error_rank, qera)(
      errors, qs, lam, keys2, **extra
    )
    more = _quantized(
      [dataclasses.replace(j, rule=qera) for j in chunk],
      errors,
      _Fit(qs, lam, a2, b2),
      extra,
    )
    cat = lambda x, y, axis: (
      None if x is None else jnp.concatenate([x, y], axis)
    )
    fit = dataclasses.replace(
      fit,
      a=cat(fit.a, more.a, -1),
      b=cat(fit.b, more.b, -2),
      a_scale=cat(fit.a_scale, more.a_scale, -1),
      b_scale=cat(fit.b_scale, more.b_scale, -2),
    )
  return {job.path: _weight(job, fit.take(i)) for i, job in enumerate(chunk)}


def _base_only(job: Job, q, input_scale):
  """A base without factors: a plain WithAux, or a rank-0 WithLqer that
  keeps an AWQ scale or a rotation."""
  if input_scale is None and job.rotation is None:
    return _qwix.WithAux(q, job.how)
  layout = job.layout
  zeros = jnp.zeros((), jnp.float32)
  return WithLqer.create(
    array=q,
    how=job.how,
    layout=layout,
    rule=job.rule,
    a=jnp.broadcast_to(zeros, layout.a_shape(0)),
    b=jnp.broadcast_to(zeros, layout.b_shape(0)),
    input_scale=input_scale,
    rotation=job.rotation,
    path=job.name,
  )
