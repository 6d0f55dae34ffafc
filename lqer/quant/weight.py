"""`WithLqer`: a Qwix PTQ weight that also carries the low-rank factors."""

import dataclasses
import functools
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer import _qwix
from lqer.core import layout as layout_lib
from lqer.core import rotation as rotation_lib


@flax.struct.dataclass(kw_only=True)
class WithLqer(_qwix.WithAux[qwix.QArray]):
  """W ~= H (deq(array) [/ input_scale] + A B), in the kernel's own axes.

  Build one with `WithLqer.create`. Attributes:
    a: (*batch, *contracting, k) left factor, `LqerRule.factor_dtype`.
    b: (*batch, k, *output) right factor.
    a_scale, b_scale: with `LqerRule.factor_qtype`, a and b hold integers
      and A = a * a_scale (one scale per column: (*batch, 1.., k)),
      B = b * b_scale (one per row: (*batch, k, 1..)); else None.
    input_scale: per-input-channel scale s (in,): the base weight is
      deq(array) / s along the contracting axes and the op divides its input
      by s. AWQ's searched scale, or SVDQuant's smoothing lam; else None.
    rotation: with `LqerRule.rotate`, the (in // b, b) int8 signs of the
      randomized block Hadamard H (`lqer.core.rotation`; the shape records
      the block b): everything above is of the rotated weight Hᵀ W, and
      the op rotates its input first, x -> x H along the contracting axes
      (flattened in kernel order), then divides by s. Else None.
    contracting_axes: kernel axes summed with the input.
    batch_axes: kernel axes shared with input and output (einsum batch).
    rule: the `LqerRule` that produced it (rank, method, qtype, ...).
    path: the param path ('block/mlp/kernel'), for error messages.
  """

  a: jax.Array
  b: jax.Array
  a_scale: jax.Array | None = None
  b_scale: jax.Array | None = None
  input_scale: jax.Array | None = None
  rotation: jax.Array | None = None
  contracting_axes: tuple[int, ...] = flax.struct.field(pytree_node=False)
  batch_axes: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  rule: Any = flax.struct.field(pytree_node=False, default=None)
  path: str = flax.struct.field(pytree_node=False, default='')

  @classmethod
  def create(
    cls,
    *,
    array,
    how,
    layout: layout_lib.KernelLayout,
    rule,
    a,
    b,
    a_scale=None,
    b_scale=None,
    input_scale=None,
    rotation=None,
    path: str = '',
  ) -> 'WithLqer':
    """The one constructor. Float factors are cast to `rule.factor_dtype`;
    with `rule.factor_qtype`, a and b are integer values (cast to that
    qtype), a_scale / b_scale their scales in factor_dtype, and float a, b
    without scales are zero placeholders (init). Abstract factors,
    `jax.ShapeDtypeStruct`s, take those dtypes too. rotation: the signs
    (`LqerRule.rotation_signs`), stored as int8."""
    quantized = rule.factor_qtype is not None
    value_dtype = (
      jnp.dtype(rule.factor_qtype) if quantized else (rule.factor_dtype)
    )

    def cast(f, dtype):
      if isinstance(f, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(f.shape, dtype)
      return jnp.asarray(f).astype(dtype)

    if quantized and a_scale is None:  # zero factors, unit scales
      a_scale = jnp.ones(layout.a_scale_shape(a.shape[-1]), jnp.float32)
      b_scale = jnp.ones(layout.b_scale_shape(a.shape[-1]), jnp.float32)
    scale = lambda x: None if x is None else cast(x, rule.factor_dtype)
    return cls(
      array=array,
      how=how,
      a=cast(a, value_dtype),
      b=cast(b, value_dtype),
      a_scale=scale(a_scale),
      b_scale=scale(b_scale),
      input_scale=input_scale,
      rotation=None if rotation is None else cast(rotation, jnp.int8),
      contracting_axes=layout.contracting_axes,
      batch_axes=layout.batch_axes,
      rule=rule,
      path=path,
    )

  def factors(self, dtype=jnp.float32):
    """(A, B) in `dtype`, dequantized when the factors are quantized."""
    a, b = _qwix.unbox(self.a), _qwix.unbox(self.b)
    if self.a_scale is None:
      return a.astype(dtype), b.astype(dtype)
    return _dequantized_factors(
      a,
      b,
      _qwix.unbox(self.a_scale),
      _qwix.unbox(self.b_scale),
      jnp.dtype(dtype),
    )

  def reconstructed(self) -> jax.Array:
    """W_hat = H (deq(array) [/ input_scale] + A B), float32, in W's shape
    (the float weight's basis: H is undone where there is one)."""
    base = qwix.dequantize(self.array).reshape(self.shape).astype(jnp.float32)
    layout = self.layout
    if self.input_scale is not None:
      base = divide_along(base, self.input_scale, layout.contracting_axes)
    if self.rank:
      a, b = layout.merge_factors(*self.factors())
      base = base + layout.from_matrix(
        jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
      )
    return self.unrotated_kernel(base)

  def rotated_kernel(self, w: jax.Array) -> jax.Array:
    """Hᵀ W of a float kernel W of this weight's shape: the weight that
    the stored base, scale and factors approximate (W without a
    rotation)."""
    if self.rotation is None:
      return w
    return rotate_along(
      w, _qwix.unbox(self.rotation), self.layout.contracting_axes
    )

  def unrotated_kernel(self, w: jax.Array) -> jax.Array:
    """H W of a kernel W in the rotated basis: back to the float model's
    (the inverse of `rotated_kernel`)."""
    if self.rotation is None:
      return w
    return rotate_along(
      w, _qwix.unbox(self.rotation), self.layout.contracting_axes, True
    )

  @property
  def rank(self) -> int:
    return _qwix.unbox(self.a).shape[-1]

  @property
  def layout(self) -> layout_lib.KernelLayout:
    return layout_lib.KernelLayout(
      tuple(self.shape), self.contracting_axes, self.batch_axes
    )


@functools.partial(jax.jit, static_argnums=4)
def _dequantized_factors(a, b, a_scale, b_scale, dtype):
  """(A * a_scale, B * b_scale) in dtype: one compiled call per shape
  outside a trace (a report over many ranks), inlined inside one."""
  return (
    a.astype(dtype) * a_scale.astype(dtype),
    b.astype(dtype) * b_scale.astype(dtype),
  )


def _new_base(old, new) -> bool:
  """Whether `new` holds other quantized values than `old`, or `old` was
  never concrete. Traced values (casts inside a model) are never flagged."""
  old_q = _qwix.unbox(getattr(old, 'qvalue', None))
  new_q = _qwix.unbox(getattr(new, 'qvalue', None))
  if (
    new_q is None
    or new_q is old_q
    or isinstance(new_q, jax.core.Tracer)
    or isinstance(old_q, jax.core.Tracer)
  ):
    return False
  if not isinstance(old_q, jax.Array | np.ndarray):
    return True  # abstract factors were never fitted
  return old_q.shape != new_q.shape or not bool(jnp.array_equal(old_q, new_q))


def _replace(self: WithLqer, **updates) -> WithLqer:
  """dataclasses.replace, refusing a new base under the old factors.

  A and B reconstruct the error of the base they were fitted to. Qwix's
  calibrated transforms (`qwix.contrib.gptq` / `qep` / `calibration`
  quantize_params) call `abs_w.replace(array=new_base)`, which would keep
  factors fitted to another base (or never fitted): that raises here.
  Same values (dtype casts, packing, device moves) pass.
  """
  if (
    'array' in updates
    and 'a' not in updates
    and self.rank > 0
    and _new_base(self.array, updates['array'])
  ):
    raise ValueError(
      f'{self.path or "an LQER weight"} (shape {tuple(self.shape)}, rule'
      f' module_path={getattr(self.rule, "module_path", None)!r}): its'
      ' quantized base is being replaced without refitting the factors'
      " A, B, which reconstruct the error of the old base. Qwix's"
      ' calibrated quantize_params (qwix.contrib.gptq, qep, calibration)'
      ' do this. Either let lqer build the base: lqer_quantize_params(fp,'
      " abstract, base='gptq'|'awq', calibration=...), or quantize with"
      ' Qwix against a qwix.PtqProvider tree and refit:'
      ' lqer_quantize_params(fp, abstract, base=<that Qwix-quantized'
      ' tree>).'
    )
  return dataclasses.replace(self, **updates)


# After the class: flax.struct.dataclass installs its own `replace`.
WithLqer.replace = _replace
nnx.register_data_type(WithLqer)


def layout_of(weight: _qwix.WithAux) -> layout_lib.KernelLayout:
  """The kernel layout of a quantized weight: a `WithLqer` carries its own;
  for a plain Qwix `WithAux` every non-channelwise axis contracts (Qwix marks
  all non-contracting axes channelwise; einsum batch axes cannot be told
  apart there)."""
  if isinstance(weight, WithLqer):
    return weight.layout
  return layout_lib.KernelLayout.from_channelwise_axes(
    tuple(weight.shape), weight.how.channelwise_axes
  )


def rotate_along(x: jax.Array, signs, axes, transpose: bool = False):
  """x -> x H (transpose: x Hᵀ) on `axes` of x, flattened in the order
  given (a kernel's contracting axes in its order, or the input axes
  they pair with, in that same order), H the rotation of `signs`
  (`lqer.core.rotation.rotate`). A kernel rotated on its contracting axes
  is Hᵀ W, its input's x H, and their product x W."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  axes = tuple(a % x.ndim for a in axes)
  rest = [a for a in range(x.ndim) if a not in axes]
  perm = rest + list(axes)
  moved = jnp.transpose(x, perm)
  flat = moved.reshape(*moved.shape[: len(rest)], -1)
  fn = rotation_lib.rotate_transpose if transpose else rotation_lib.rotate
  out = fn(flat, signs, -1).reshape(moved.shape)
  return jnp.transpose(out, np.argsort(perm))


def divide_along(x: jax.Array, s: jax.Array, axes) -> jax.Array:
  """x / s along `axes`: how a per-input-channel scale s (in,) applies, to
  the base weight (deq(Wq) / s on its contracting axes) or to the input
  (x / s on the axes it contracts), so x (deq(Wq) / s) = (x / s) deq(Wq).

  axes: an int, or the axes of x that s flattens, in the kernel's order of
  its contracting axes (`KernelLayout.to_matrix` flattens them that way).
  """
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  s_nd = s.reshape([x.shape[a] for a in axes])
  s_nd = jnp.transpose(s_nd, np.argsort(axes))
  shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
  return x / s_nd.reshape(shape).astype(x.dtype)
