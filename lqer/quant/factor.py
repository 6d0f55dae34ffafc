"""Factoring quantization errors, shared by the offline pass and the
provider's init: E = W - base, reshaped to the (*batch, in, out) matrix the
op multiplies (`lqer.core.layout`), factored by the rule's method
(`lqer.core.decompose`), and the one place a float weight becomes a `WithLqer`.
SVDQuant factors the smoothed weight before its base exists (`svdquant_fn`).
"""

import functools
import math
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import qwix

from lqer import _qwix
from lqer.core import decompose
from lqer.core import layout as layout_lib
from lqer.quant import bases
from lqer.quant.weight import WithLqer
from lqer.quant.weight import divide_along
from lqer.quant.weight import rotate_along

_FACTOR_FNS: dict[Any, Any] = {}


def check_weight(name: str, w, layout: layout_lib.KernelLayout, rank: int):
  """Raises naming the weight if it is not a finite float of a factorable
  layout (NaN checks are skipped on traced values)."""
  layout.check_rank(rank, name)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f'{name}: expected a float weight, got {w.dtype}')
  finite = jnp.all(jnp.isfinite(w))
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    bad = int(jnp.sum(~jnp.isfinite(w)))
    raise ValueError(f'{name}: weight holds {bad} NaN/Inf values')


def _solver_kw(rule, rank=0, layout=None) -> dict[str, Any]:
  """The rule's solver settings; 'exact' where a randomized sketch would
  span over a quarter of the matrix (rank + oversample > min(in, out) / 4,
  as rank 'auto' factors at its largest rank): there the full SVD is
  faster (576 x 1536 at rank 264 on CPU: 2.8 s vs 11.1 s for 8 weights)."""
  solver = rule.solver
  if layout is not None and 4 * (rank + rule.oversample) > layout.max_rank:
    solver = 'exact'
  return dict(
    solver=solver,
    oversample=rule.oversample,
    power_iters=rule.resolved_power_iters,
    krylov=rule.krylov,
  )


def _cached(key, make):
  """jax.jit(jax.vmap(make())), built once per settings `key`."""
  if key not in _FACTOR_FNS:
    _FACTOR_FNS[key] = jax.jit(jax.vmap(make()))
  return _FACTOR_FNS[key]


def _mm(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def base_error(layout, w, q, input_scale):
  """E = w - deq(q) [/ input_scale] in the (*batch, in, out) matrix form."""
  deq = qwix.dequantize(q).astype(jnp.float32)
  if input_scale is not None:
    deq = divide_along(deq, input_scale, layout.contracting_axes)
  return layout.to_matrix(w.astype(jnp.float32) - deq)


def factor_fn(layout: layout_lib.KernelLayout, rank: int, rule, how=None):
  """Jitted, batched (ws, bases, input_scales, keys, **stats) -> (qs, A, B).

  Each E = w - deq(q) [/ input_scale] is factored in the (*batch, in, out)
  matrix form; A (*, in, k), B (*, k, out) float32. Stats: act_abs_mean
  (l2qer) or chol (qera). bases: the QArrays q (qs is then None), or, with
  `how` (the RTN base fused in), Qwix's (scale, zero_point) of each w, and
  q = quantize_with_scale_zero_point(w) is computed here: one pass over W,
  no int4 array materialised and read back. Cached by the settings.
  """
  solver_kw = _solver_kw(rule, rank, layout)
  key = (layout, rank, rule.method, tuple(solver_kw.items()), repr(how))

  def make():
    def one(w, base, input_scale, key, act_abs_mean=None, chol=None):
      q = (
        base
        if how is None
        else _qwix.quantize_with_scale_zero_point(
          w, how.qtype, *base, how.noise_fn
        )
      )
      error = base_error(layout, w, q, input_scale)
      a, b = decompose.reconstruct(
        error,
        rank,
        rule.method,
        act_abs_mean=act_abs_mean,
        chol=chol,
        key=key,
        **solver_kw,
      )
      return (None if how is None else q), a, b

    return one

  return _cached(key, make)


def quantize_fn(layout: layout_lib.KernelLayout, rule):
  """Jitted, batched (ws, qs, input_scales, A, keep, **stats) ->
  (qa, sa, qb, sb): `decompose.quantize_factors` of each weight's float A
  (*, in, k) against its error E = w - deq(q) [/ s], B refitted; columns
  where keep (*, k) is False are cut (zero, B rows zero)."""
  key = ('quantize', layout, rule.method, rule.factor_bits)

  def make():
    def one(w, q, input_scale, a, keep, act_abs_mean=None, chol=None):
      return decompose.quantize_factors(
        base_error(layout, w, q, input_scale),
        a * keep,
        rule.factor_bits,
        rule.method,
        act_abs_mean=act_abs_mean,
        chol=chol,
      )

    return one

  return _cached(key, make)


def objective_fn(layout: layout_lib.KernelLayout, rule):
  """Jitted, batched (ws, qs, input_scales, A, B, **stats) -> per weight
  ||T (E - A B)||_F^2, the method's objective (`decompose.weigh`)."""
  key = ('objective', layout, rule.method)

  def make():
    def one(w, q, input_scale, a, b, act_abs_mean=None, chol=None):
      left = base_error(layout, w, q, input_scale) - _mm(a, b)
      return jnp.sum(
        jnp.square(
          decompose.weigh(
            left, rule.method, act_abs_mean=act_abs_mean, chol=chol
          )
        )
      )

    return one

  return _cached(key, make)


def energy_fn(layout: layout_lib.KernelLayout, rule):
  """Jitted, batched (ws, qs, input_scales, A, **stats) -> (gains (*, k),
  ||T W||_F^2, ||T E||_F^2): what each rank-1 term of A B removes from the
  method's objective, the weight's output energy and its base's error
  under it (the scales rank allocation may compare layers by)."""
  key = ('energy', layout, rule.method)

  def make():
    def one(w, q, input_scale, a, act_abs_mean=None, chol=None):
      stats = dict(act_abs_mean=act_abs_mean, chol=chol)
      gains = decompose.component_energy(a, rule.method, **stats)
      energy = lambda m: jnp.sum(
        jnp.square(decompose.weigh(m, rule.method, **stats))
      )
      return (
        gains.reshape(-1, gains.shape[-1]).sum(0),
        energy(layout.to_matrix(w.astype(jnp.float32))),
        energy(base_error(layout, w, q, input_scale)),
      )

    return one

  return _cached(key, make)


def svdquant_fn(layout: layout_lib.KernelLayout, rank: int, rule):
  """Jitted, batched (ws, act_abs_max, keys) -> (A, B, R, lam, scales).

  lam = `decompose.smoothing_scale` of each w (matrix form) and max |x|;
  A (*, in, k), B (*, k, out) from `decompose.svdquant_split`; the residual
  R = diag(lam) W - L1 L2 in the kernel's layout, for the base quantizer.
  With factor_qtype, A and B are quantized first (scales = (sa, sb), else
  None) and R = diag(lam) (W - Â B̂) absorbs their rounding.
  """
  solver_kw = _solver_kw(rule)
  key = (
    'svdquant',
    layout,
    rank,
    rule.smooth_alpha,
    rule.factor_bits,
    tuple(solver_kw.items()),
  )

  def make():
    def one(w, act_abs_max, key):
      m = layout.to_matrix(w.astype(jnp.float32))
      lam = decompose.smoothing_scale(act_abs_max, m, rule.smooth_alpha)
      a, b, r = decompose.svdquant_split(m, lam, rank, key=key, **solver_kw)
      scales = None
      if rule.factor_bits and rank:  # W' = diag(lam) Â B̂ + R
        qa, sa, qb, sb = decompose.quantize_factors(
          m, a, rule.factor_bits, 'svdquant', lam=lam
        )
        r = lam[..., :, None] * (m - _mm(qa * sa, qb * sb))
        a, b, scales = qa, qb, (sa, sb)
      return a, b, layout.from_matrix(r), lam, scales

    return one

  return _cached(key, make)


def seed_key(rule, path: str) -> jax.Array:
  """The randomized solver's key of one weight: the rule's seed folded with
  a hash of the param path, so weights get independent sketches."""
  return jax.random.fold_in(
    jax.random.key(rule.seed), zlib.crc32(path.encode())
  )


def check_shape(name: str, stored_shape, op_shape):
  """Raises unless a param stored as `stored_shape` is the kernel an op
  multiplies as `op_shape`: equal, or stored flattened (another number of
  axes, as Qwix allows). A transposed read is refused: it is how a tied
  embedding serves as the output projection."""
  stored_shape, op_shape = tuple(stored_shape), tuple(op_shape)
  if stored_shape == op_shape:
    return
  if math.prod(stored_shape) != math.prod(op_shape):
    raise ValueError(
      f'{name}: float weight of shape {stored_shape} does not'
      f' fit the quantized weight of shape {op_shape}'
    )
  if len(stored_shape) == len(op_shape):
    hint = (
      ' The op reads this param transposed, as a tied embedding read'
      ' as the output projection (x @ table.T) is: Qwix cannot'
      ' quantize a table that is also read by a gather, so exclude it'
      ' from the rules (a module_path that does not match it).'
      if sorted(stored_shape) == sorted(op_shape)
      else ''
    )
    raise ValueError(
      f'{name}: float weight of shape {stored_shape} but the'
      f' op multiplies a kernel of shape {op_shape}; only a'
      ' param stored flattened is reshaped.' + hint
    )


def check_tiles(name: str, shape, how):
  """Raises naming the weight if a tile size does not divide its axis."""
  for axis, tile in how.tiled_axes.items():
    size = shape[axis]
    n = round(1 / tile) if isinstance(tile, float) else None
    if size % tile if n is None else size % n:
      valid = [d for d in range(1, size + 1) if size % d == 0]
      raise ValueError(
        f'{name}: tile_size {tile} does not divide axis {axis} of size'
        f' {size} (kernel shape {tuple(shape)}); valid tile sizes for this'
        f' axis: {valid}'
      )


def build(path: str, w, how, layout, rule) -> WithLqer:
  """A `WithLqer` from a float weight at the provider's init: Qwix's RTN
  base; 'svd' factors of a fixed rank computed (free under eval_shape),
  quantized with factor_qtype; activation-aware methods and rank 'auto'
  zero until `lqer_quantize_params` runs (with statistics / a budget).
  With `rule.rotate`, all of it of the rotated Hᵀ W (`rotated`), the
  signs stored; rank None then gives a rank-0 weight."""
  rank = rule.total_rank or 0
  check_weight(path, w, layout, rank)
  check_tiles(path, w.shape, how)
  signs = rule.rotation_signs(layout.in_size, path)
  if signs is not None:
    w = rotated(w, signs, layout)
  input_scale = scales = None
  if rule.rank is None or rule.needs_calibration or rule.auto_rank:
    q, _ = bases.rtn(w, how, layout, None)
    zero = jnp.zeros((), rule.factor_dtype)
    a = jnp.broadcast_to(zero, layout.a_shape(rank))
    b = jnp.broadcast_to(zero, layout.b_shape(rank))
    if rule.method == 'svdquant' and rule.rank is not None:
      input_scale = jnp.ones((layout.in_size,), jnp.float32)  # uncalibrated
  else:
    stack = lambda x: jax.tree.map(lambda v: v[None], x)
    q, a, b = factor_fn(layout, rule.rank, rule, how)(
      stack(w),
      stack(bases.rtn_scale(w, how)),
      None,
      stack(seed_key(rule, path)),
    )
    if rule.factor_qtype is not None:
      a, sa, b, sb = quantize_fn(layout, rule)(
        stack(w), q, None, a, jnp.ones((1, rule.rank), bool)
      )
      scales = layout.split_scales(sa[0], sb[0])
    q = jax.tree.map(lambda v: v[0], q)
    a, b = layout.split_factors(a[0], b[0])
  a_scale, b_scale = scales or (None, None)
  return WithLqer.create(
    array=q,
    how=how,
    layout=layout,
    rule=rule,
    a=a,
    b=b,
    a_scale=a_scale,
    b_scale=b_scale,
    input_scale=input_scale,
    rotation=signs,
    path=path,
  )


def rotated(w, signs, layout: layout_lib.KernelLayout):
  """Hᵀ W: the kernel w rotated on its contracting axes (flattened in its
  order), for the base and the factors to approximate; computed in float32,
  returned in w's dtype (the base's scales keep it, as unrotated). A
  NamedSharding of w is kept."""
  out = _rotated(jnp.asarray(w), jnp.asarray(signs), layout.contracting_axes)
  sharding = getattr(w, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(
    out, jax.core.Tracer
  ):
    out = jax.device_put(out, sharding)
  return out


@functools.partial(jax.jit, static_argnums=2)
def _rotated(w, signs, axes):
  return rotate_along(w, signs, axes)


def place_factors(sharding, layout, a, b, a_scale=None, b_scale=None):
  """Shards A like W's batch + contracting axes and B like its batch +
  output axes (the rank axis replicated), their scales like W's batch axes,
  when W's `sharding` is a NamedSharding (else returns them as they are).

  Args:
    sharding: the kernel's sharding (or None).
    layout: its `KernelLayout`.
    a, b: the factors in kernel axes ((*batch, *contracting, k) and
      (*batch, k, *output)).
    a_scale, b_scale: their scales, or None.

  Returns:
    (a, b, a_scale, b_scale), placed.
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return a, b, a_scale, b_scale
  ndim = len(layout.shape)
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  batch = [spec[x] for x in layout.batch_axes]
  a_spec = batch + [spec[x] for x in layout.contracting_axes] + [None]
  b_spec = batch + [None] + [spec[x] for x in layout.output_axes]
  named = lambda s: jax.sharding.NamedSharding(
    sharding.mesh, jax.sharding.PartitionSpec(*s)
  )
  put = lambda x, s: None if x is None else jax.device_put(x, named(s))
  unsharded = lambda s: batch + [None] * (len(s) - len(batch))
  return (
    put(a, a_spec),
    put(b, b_spec),
    put(a_scale, unsharded(a_spec)),
    put(b_scale, unsharded(b_spec)),
  )
