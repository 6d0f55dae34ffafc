"""Int4 kernels packed two per byte, for a faster CPU matmul.

XLA:CPU reads an `s4` array nibble by nibble (about 0.3-0.5 ns per element
on the benchmark machine), which makes dequantizing an int4 weight cost as
much as the float matmul it replaces. A packed weight holds the same bits as
plain uint8 bytes, the low nibble from the left half of the columns and the
high nibble from the right half, p[i, j] = (q[i, j] & 15) | (q[i, j + h] &
15) << 4 with h = out / 2, for the kernel viewed as an (in, out) matrix, so
dequantization is two vectorizable byte operations per element pair, each
with a contiguous run of scales and output columns (arithmetic shifts of the
bytes viewed as int8):

    q[i, j]   = (p << 4) >> 4,     q[i, j + h] = p >> 4

The matrix is the kernel's matrix form (`lqer.core.layout`): its axes permuted
once, at pack time, to (*batch, *contracting, *output), output axes in
kernel order, contracting axes in kernel order too unless the scale groups
need another to be runs of consecutive rows (`row_order`), and flattened to
(*batch, in, out). So any einsum layout (Gemma's 'BTD,NDH->BTNH',
'BSD,CKDH->CBSKH', ...) multiplies as plain rows times columns; the matmul
moves the input's axes instead.

Param bytes do not change (0.5 byte per weight). `pack_params` converts a
quantized tree once, after `lqer_quantize_params` (or a checkpoint load);
`LqerProvider` then runs `packed_dot_general` on those weights.
"""

import dataclasses
import functools
import math
from typing import Any
import warnings

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import qwix

from lqer import _qwix
from lqer.core import layout as layout_lib
from lqer.core.paths import path_str
from lqer.kernels import ffi
from lqer.quant.weight import layout_of

# Block sizes, tuned with benchmarks/inference.py on a 2-core AVX-512 CPU
# (XLA:CPU). Bytes of one dequantized block of columns (at most MAX_BLOCKS
# blocks per weight):
BLOCK_BYTES = 2 << 20
MAX_BLOCKS = 16
# One token: rows per block. On the benchmark MLP, blocks of 256 whole rows
# ran at 0.63-0.67x FP32's time, blocks of columns ~1.0x, 128 rows 0.73x,
# 512 rows 1.27x, 1024 rows 1.9x (the two cores' caches).
MATVEC_BLOCK_ROWS = 256
# Rows of x per dot for TOKEN_CHUNK < tokens < CHUNK_BELOW: XLA:CPU's dot on
# a dequantized block ran ~2x slower at 17-63 rows than as 16-row slices.
TOKEN_CHUNK = 16
CHUNK_BELOW = 64


@flax.struct.dataclass
class PackedInt4:
  """int4 kernel as (*batch, in, out) matrices of uint8 pairs (j, j + out/2).

  Attributes:
    packed: uint8 (*batch, in, out // 2), the kernel permuted by `perm` and
      flattened: in = prod(contracting dims), out = prod(output dims).
    scale: (*batch, groups, out) float; `in / groups` consecutive rows share
      one.
    layout: the kernel's `KernelLayout` (its original shape and axis roles),
      with its contracting axes in row order (`row_order`).
    scale_shape: the QArray's scale shape, in kernel axes (for `unpack`).
    qtype: the QArray's qtype (for `unpack`).
  """

  packed: jax.Array
  scale: jax.Array
  layout: layout_lib.KernelLayout = flax.struct.field(pytree_node=False)
  scale_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  qtype: Any = flax.struct.field(pytree_node=False, default=None)

  shape = property(lambda self: self.layout.shape)
  ndim = property(lambda self: len(self.layout.shape))
  dtype = property(lambda self: self.scale.dtype)

  @property
  def perm(self) -> tuple[int, ...]:
    """Kernel axes in packed order: batch, contracting (row order), output,
    the last in kernel order."""
    lay = self.layout
    return lay.batch_axes + lay.contracting_axes + lay.output_axes


def row_order(scale_shape, layout) -> tuple[int, ...] | None:
  """Contracting axes in an order that makes every scale group a run of
  consecutive rows: the axes with a scale per index, then the one tiled
  axis, then the axes sharing one scale, each in kernel order; None if
  several axes are tiled. Qwix's per-channel scales keep kernel order; its
  tiles (of the last contracting axis, shared along the others) put that
  axis first, e.g. rows (H, N) for an (N, H, D) kernel tiled along H."""
  kind = {
    a: 0 if s == d else 2 if s == 1 else 1
    for a, (s, d) in enumerate(zip(scale_shape, layout.shape))
    if a in layout.contracting_axes
  }
  if sum(k == 1 for k in kind.values()) > 1:
    return None
  return tuple(sorted(kind, key=lambda a: (kind[a], a)))


def unpackable_reason(
  q: qwix.QArray, layout: layout_lib.KernelLayout
) -> str | None:
  """Why `q`, a kernel of `layout`, cannot be packed (None if it can)."""
  if not isinstance(q, qwix.QArray) or q.qvalue.dtype != jnp.int4:
    return 'not an int4 QArray'
  if q.zero_point is not None:
    return 'asymmetric (has a zero point)'
  if layout.out_size % 2:
    return f'odd output size {layout.out_size}'
  for axis in layout.batch_axes + layout.output_axes:
    if q.scale.shape[axis] not in (1, q.shape[axis]):
      return f'scale tiled along kernel axis {axis}, not a contracting axis'
  if row_order(q.scale.shape, layout) is None:
    return 'scale tiled along several contracting axes'
  return None


def _scale_layout(layout, scale_shape) -> layout_lib.KernelLayout:
  """Layout of the scale broadcast to full size along batch and output
  axes: its matrix form is (*batch, groups, out)."""
  shape = tuple(
    s if a in layout.contracting_axes else d
    for a, (s, d) in enumerate(zip(scale_shape, layout.shape))
  )
  return dataclasses.replace(layout, shape=shape)


def pack(
  q: qwix.QArray, layout: layout_lib.KernelLayout | None = None
) -> PackedInt4:
  """Packs an int4 QArray, a kernel of `layout` (default: contracting on
  axis 0), see the module doc and `unpackable_reason`."""
  layout = layout or layout_lib.KernelLayout(tuple(q.shape), (0,))
  layout = dataclasses.replace(
    layout, contracting_axes=row_order(q.scale.shape, layout)
  )
  nibbles = (layout.to_matrix(q.qvalue.astype(jnp.int8)) & 15).astype(jnp.uint8)
  half = layout.out_size // 2
  packed = nibbles[..., :half] | (nibbles[..., half:] << 4)
  scale_layout = _scale_layout(layout, q.scale.shape)
  scale = scale_layout.to_matrix(jnp.broadcast_to(q.scale, scale_layout.shape))
  return PackedInt4(
    packed=packed,
    scale=scale,
    layout=layout,
    scale_shape=tuple(q.scale.shape),
    qtype=q.qtype,
  )


def as_qarray(array) -> qwix.QArray:
  """The QArray of a weight's array: unpacked if `pack_params` packed it."""
  return unpack(array) if isinstance(array, PackedInt4) else array


def unpack(p: PackedInt4) -> qwix.QArray:
  """The QArray `p` was packed from, bit-exact: the inverse of `pack`."""
  qvalue = p.layout.from_matrix(jnp.concatenate(_signed_nibbles(p.packed), -1))
  scale = _scale_layout(p.layout, p.scale_shape).from_matrix(p.scale)
  scale = scale[tuple(slice(0, s) for s in p.scale_shape)]
  return qwix.QArray(qvalue=qvalue.astype(jnp.int4), scale=scale, qtype=p.qtype)


def _packed(path: str, leaf, skipped: list[str]):
  """`leaf` with its array packed, or unchanged if it cannot be (an int4
  one then listed in `skipped` as 'path: reason')."""
  if not isinstance(leaf, _qwix.WithAux) or isinstance(leaf.array, PackedInt4):
    return leaf
  layout = layout_of(leaf)
  reason = unpackable_reason(leaf.array, layout)
  if reason is None:
    return leaf.replace(
      array=jax.jit(pack, static_argnums=1)(leaf.array, layout)
    )
  qvalue = getattr(leaf.array, 'qvalue', None)
  if qvalue is not None and qvalue.dtype == jnp.int4:
    skipped.append(f'{path}: {reason}')
  return leaf


def _pack_linen(params, skipped):
  is_weight = lambda x: isinstance(x, _qwix.WithAux)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=is_weight
  )
  return treedef.unflatten(
    [
      _packed(
        jax.tree_util.keystr(path, simple=True, separator='/'), leaf, skipped
      )
      for path, leaf in leaves
    ]
  )


def _pack_nnx(model: nnx.Module, skipped):
  """In place: NNX keeps each weight's arrays as separate `nnx.Param`s."""
  for path, module in nnx.iter_graph(model):
    if not isinstance(module, nnx.Module):
      continue
    for name, value in list(vars(module).items()):
      if isinstance(value, _qwix.WithAux):
        unboxed = jax.tree.map(_qwix.unbox, value)
        new = _packed(path_str((*path, name)), unboxed, skipped)
        if new is not unboxed:
          setattr(module, name, jax.tree.map(nnx.Param, new))


def pack_params(params):
  """Packs every packable int4 weight two per byte (`PackedInt4`).

  Any kernel layout packs (contracting axes anywhere, einsum batch axes),
  unless it has a zero point, an odd output size, or a scale tiled along an
  output or batch axis or along several contracting axes. Such int4 weights
  keep the generic dequantize-at-use path and are listed, with their param
  path and reason, in one `UserWarning` per call. Weights of other qtypes
  (int8, fp8, nf4, ...) are never candidates and not listed. A plain Qwix
  weight of an einsum with batch axes packs as if they were output axes
  (Qwix records none) and is dequantized whole at its use
  (`lqer.providers.matmul`).

  Args:
    params: a Linen params tree, or an NNX module (packed in place).

  Returns:
    The params with packed weights (the same bytes: 0.5 per weight).

  Raises:
    ValueError: naming the param, if an LQER factor (a, b or their scales)
      holds NaN or inf; nothing is packed then.
  """
  _refuse_non_finite_factors(params)
  skipped = []
  if isinstance(params, nnx.Module):
    _pack_nnx(params, skipped)
  else:
    params = _pack_linen(params, skipped)
  if skipped:
    warnings.warn(
      f'lqer.pack_params: {len(skipped)} int4 weight(s) left unpacked (the'
      ' generic dequantize-at-use path):\n  ' + '\n  '.join(skipped),
      stacklevel=2,
    )
  return params


_FACTOR_FIELDS = ('a', 'b', 'a_scale', 'b_scale')


def _refuse_non_finite_factors(params):
  """ValueError naming the first weight whose factors hold NaN or inf. One
  device read for the whole tree; traced params are not checked."""
  is_weight = lambda x: isinstance(x, _qwix.WithAux)
  if isinstance(params, nnx.Module):
    weights = [
      (path_str((*path, name)), value)
      for path, module in nnx.iter_graph(params)
      if isinstance(module, nnx.Module)
      for name, value in vars(module).items()
      if is_weight(value)
    ]
  else:
    weights = [
      (jax.tree_util.keystr(path, simple=True, separator='/'), leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=is_weight
      )[0]
      if is_weight(leaf)
    ]
  named = [
    (f'{path}: its LQER factor {field}', value)
    for path, leaf in weights
    for field in _FACTOR_FIELDS
    for value in [_qwix.unbox(getattr(leaf, field, None))]
    if isinstance(value, jax.Array)
    and not isinstance(value, jax.core.Tracer)
    and jnp.issubdtype(value.dtype, jnp.inexact)
  ]
  if not named:
    return
  finite = jax.device_get([jnp.all(jnp.isfinite(v)) for _, v in named])
  for (what, _), ok in zip(named, finite):
    if not ok:
      raise ValueError(
        f'lqer.pack_params: {what} holds NaN or inf; the served model would'
        ' output NaN. Re-quantize the weight, or pass finite adapters to'
        ' lqer.from_lora.'
      )


def unfoldable_zero(value, dtype):
  """0 * value[first element]: a zero XLA cannot fold (value could be NaN),
  so whatever it is added to depends on `value` and is not hoisted to the
  start of the program (`optimization_barrier` is dropped before scheduling
  on XLA:CPU)."""
  return jnp.zeros((), dtype) * value.reshape(-1)[0].astype(dtype)


def _signed_nibbles(packed):
  """(low, high) nibbles of uint8 bytes as int8 in [-8, 7]: arithmetic
  shifts sign-extend them, (b << 4) >> 4 and b >> 4 on the int8 view."""
  b = jax.lax.bitcast_convert_type(packed, jnp.int8)
  four = jnp.int8(4)
  return (
    jax.lax.shift_right_arithmetic(jax.lax.shift_left(b, four), four),
    jax.lax.shift_right_arithmetic(b, four),
  )


def _dequantize(nibbles, scale, dtype, offset=0, group_rows=None):
  """w[i, j] = q[i, j] * scale[(offset + i) // group_rows, j] for q (rows,
  cols) and scale (groups, cols): rows from `offset` into the first group
  on. group_rows None: rows / groups (whole groups)."""
  rows, cols = nibbles.shape
  groups = scale.shape[0]
  q, scale = nibbles.astype(dtype), scale.astype(dtype)
  if group_rows is None or (offset == 0 and rows == groups * group_rows):
    return (q.reshape(groups, rows // groups, cols) * scale[:, None]).reshape(
      rows, cols
    )
  cuts = [0, *range(group_rows - offset, rows, group_rows), rows]
  return jnp.concatenate(
    [q[r0:r1] * scale[g] for g, (r0, r1) in enumerate(zip(cuts, cuts[1:]))]
  )


def _dot(x, w):
  """x @ w accumulated in float32; TOKEN_CHUNK rows per dot when x has
  more than TOKEN_CHUNK and fewer than CHUNK_BELOW rows."""
  tokens = x.shape[0]
  if TOKEN_CHUNK < tokens < CHUNK_BELOW:
    return jnp.concatenate(
      [
        jnp.dot(x[r : r + TOKEN_CHUNK], w, preferred_element_type=jnp.float32)
        for r in range(0, tokens, TOKEN_CHUNK)
      ],
      0,
    )
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _matvec_block_rows(group_rows: int) -> int:
  """Rows per block of the one-token path: whole scale groups up to
  MATVEC_BLOCK_ROWS, else MATVEC_BLOCK_ROWS (a block then lies in one group
  or straddles two). At most 2 * rows / MATVEC_BLOCK_ROWS + 1 blocks."""
  if group_rows <= MATVEC_BLOCK_ROWS:
    return group_rows * (MATVEC_BLOCK_ROWS // group_rows)
  return MATVEC_BLOCK_ROWS


def _by_row_blocks(x, packed, scale, dtype):
  """x (1, rows) @ deq(packed, scale), one block of rows at a time, summed."""
  rows, half = packed.shape
  group_rows = rows // scale.shape[0]
  step = _matvec_block_rows(group_rows)
  sums = [None, None]
  link = x
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    g0 = r0 // group_rows
    block_scale = scale[g0 : -(-r1 // group_rows)] + unfoldable_zero(
      link, scale.dtype
    )
    xr = x[:, r0:r1]
    for i, nibbles in enumerate(_signed_nibbles(packed[r0:r1])):
      w = _dequantize(
        nibbles,
        block_scale[:, i * half : (i + 1) * half],
        dtype,
        r0 - g0 * group_rows,
        group_rows,
      )
      y = _dot(xr, w)
      sums[i] = y if sums[i] is None else sums[i] + y
    link = sums[1]
  return jnp.concatenate(sums, -1)


def _by_column_blocks(x, packed, scale, dtype, low_rank):
  """x @ deq(packed, scale) [+ xa @ b], one cache-sized block of columns at
  a time."""
  rows, half = packed.shape
  width = max(
    1,
    BLOCK_BYTES // (rows * 2 * jnp.dtype(dtype).itemsize),
    -(-half // MAX_BLOCKS),
  )
  halves = ([], [])
  link = x
  for c0 in range(0, half, width):
    c1 = min(half, c0 + width)
    zero = unfoldable_zero(link, scale.dtype)
    for nibbles, out, offset in zip(
      _signed_nibbles(packed[:, c0:c1]), halves, (0, half)
    ):
      y = _dot(
        x,
        _dequantize(nibbles, scale[:, offset + c0 : offset + c1] + zero, dtype),
      )
      if low_rank is not None:
        xa, b = low_rank
        y = y + jnp.dot(
          xa,
          b[:, offset + c0 : offset + c1],
          preferred_element_type=jnp.float32,
        )
      out.append(y)
    link = halves[1][-1]
  return jnp.concatenate(halves[0] + halves[1], -1)


def _matmul(x, packed, scale, low_rank, dtype):
  """x (tokens, in) @ deq(packed (in, out/2), scale (groups, out)) [+ xa
  (tokens, k) @ b (k, out)], float32 (tokens, out), on XLA.

  One token (a matrix-vector product): blocks of MATVEC_BLOCK_ROWS rows,
  partial products summed, branch added once. More tokens: blocks of
  columns, the branch added block by block so its full-size output is never
  materialized. Each block's dequantization depends on the previous block's
  output (a zero XLA cannot fold), so XLA keeps one block live instead of
  hoisting all.
  """
  if x.shape[0] > 1:
    return _by_column_blocks(x, packed, scale, dtype, low_rank)
  y = _by_row_blocks(x, packed, scale, dtype)
  if low_rank is not None:
    xa, b = low_rank
    y = y + jnp.dot(xa, b, preferred_element_type=jnp.float32)
  return y


KERNELS = ('auto', 'ffi', 'xla')
_FALLBACK_WARNED = []


def resolve_kernel(kernel: str) -> str:
  """'ffi' or 'xla' for a packed matmul.

  'auto': lqer's int4 CPU kernel on CPU when it is built and loads and the
  process has one device, else the XLA path (on CPU, with one warning
  naming why); other backends: 'xla'. With several devices (a mesh, forced
  host devices, jax.distributed) XLA's SPMD partitioner would gather a
  custom call's sharded operands to every device, so 'auto' keeps the
  partitionable XLA path. 'ffi': the kernel (sharded operands gathered), or
  a RuntimeError naming why it is unavailable.
  """
  if kernel not in KERNELS:
    raise ValueError(f'int4_kernel must be one of {KERNELS}, got {kernel!r}')
  if kernel == 'xla' or (kernel == 'auto' and jax.default_backend() != 'cpu'):
    return 'xla'
  if not ffi.available():
    if kernel == 'ffi':
      raise RuntimeError(f"int4_kernel='ffi': {ffi.unavailable_reason()}")
    _warn_once(
      f'the int4 CPU kernel is unavailable ({ffi.unavailable_reason()})'
    )
    return 'xla'
  if kernel == 'auto' and jax.device_count() > 1:
    _warn_once(
      f'{jax.device_count()} devices: the int4 CPU kernel is not partitioned'
      ' (XLA would gather sharded weights to every device); pass'
      " int4_kernel='ffi' to run it anyway"
    )
    return 'xla'
  return 'ffi'


def _warn_once(why: str):
  if not _FALLBACK_WARNED:
    _FALLBACK_WARNED.append(True)
    warnings.warn(
      f'lqer: {why}; packed weights run on the XLA path', stacklevel=4
    )


def fits(p: PackedInt4, dimension_numbers) -> bool:
  """Whether a dot_general with these dimension numbers contracts and
  batches the kernel axes `p` was packed for (a plain Qwix weight's layout,
  from its channelwise axes, counts einsum batch axes as output axes)."""
  (_, rhs_c), (_, rhs_b) = dimension_numbers
  return sorted(rhs_c) == sorted(p.layout.contracting_axes) and sorted(
    rhs_b
  ) == sorted(p.layout.batch_axes)


def _paired(lhs_axes, rhs_axes, kernel_axes) -> tuple[int, ...]:
  """The lhs axes paired with `kernel_axes`, in that order."""
  return tuple(lhs_axes[list(rhs_axes).index(a)] for a in kernel_axes)


def _batched_low_rank(low_rank, call_batch, rhs_b, layout, tokens):
  """(xa, b) as (nb, tokens, k) and (nb, k, out), batch flattened in
  `layout` order, from xa (*batch in the call's order, tokens, k) and b
  (*batch in `layout` order, k, out), each in any row-major reshaping."""
  xa, b = low_rank
  nb = math.prod(layout.batch_shape)
  k = b.size // (nb * layout.out_size)
  order = [list(rhs_b).index(a) for a in layout.batch_axes]
  xa = jnp.transpose(
    xa.reshape(*call_batch, tokens, k), (*order, len(order), len(order) + 1)
  )
  return xa.reshape(nb, tokens, k), b.reshape(nb, k, layout.out_size)


def _as_matrix_input(lhs, p: PackedInt4, dimension_numbers):
  """(x, to_output): lhs as x (nb, tokens, in), the packed matrix's rows
  last (the lhs contracting axes in the row order of the kernel axes they
  pair with), its batch axes first (in `p.layout.batch_axes` order); and
  the map of y (nb, tokens, out) to dot_general's output shape (*batch in
  the call's order, *lhs free, *kernel output dims in kernel order)."""
  if not fits(p, dimension_numbers):
    raise ValueError(
      f'packed int4 kernel {p.shape} (contracting axes'
      f' {p.layout.contracting_axes}, batch axes {p.layout.batch_axes}):'
      f' unsupported dimension numbers {dimension_numbers}'
    )
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  layout = p.layout
  lb = _paired(lhs_b, rhs_b, layout.batch_axes)
  lc = _paired(lhs_c, rhs_c, layout.contracting_axes)
  free = [a for a in range(lhs.ndim) if a not in lb + lc]
  nb = math.prod(layout.batch_shape)
  x = jnp.transpose(lhs, (*lb, *free, *lc)).reshape(nb, -1, layout.in_size)

  def to_output(y):
    y = y.reshape(
      *layout.batch_shape, *[lhs.shape[a] for a in free], *layout.output_shape
    )
    to_call = [layout.batch_axes.index(a) for a in rhs_b]
    return jnp.transpose(y, (*to_call, *range(len(rhs_b), y.ndim)))

  return x, to_output


def _weight_matrices(p: PackedInt4):
  """packed (nb, in, out / 2) and scale (nb, groups, out)."""
  nb = math.prod(p.layout.batch_shape)
  return (
    p.packed.reshape(nb, p.layout.in_size, -1),
    p.scale.reshape(nb, -1, p.layout.out_size),
  )


def packed_dot_general(
  lhs,
  p: PackedInt4,
  dimension_numbers,
  compute_dtype,
  low_rank=None,
  kernel='auto',
):
  """dot_general(lhs, deq(p)) [+ xa @ b], float32.

  lhs is cast to `compute_dtype` (float32 or bfloat16). kernel
  (`resolve_kernel`): 'ffi' runs lqer's int4 CPU kernel (`lqer.kernels.ffi`:
  nibbles dequantized in registers, float32 accumulation) and adds xa @ b
  after it (`kernel_dot_general` fuses the branch); 'xla' dequantizes block
  by block in XLA (`_matmul`). Each batch
  entry of the packed matrix is one matmul (vmapped). low_rank: optional
  float32 (xa, b), the LQER branch: xa (*batch in the call's order, *lhs
  free, k) and b (*batch in `p.layout` order, k, *output), each in any
  row-major reshaping (the provider passes them unflattened). Returns
  float32 of dot_general's output shape (`_as_matrix_input`).
  """
  x, to_output = _as_matrix_input(lhs, p, dimension_numbers)
  packed, scale = _weight_matrices(p)
  if low_rank is not None:
    (_, _), (lhs_b, rhs_b) = dimension_numbers
    low_rank = _batched_low_rank(
      low_rank, [lhs.shape[a] for a in lhs_b], rhs_b, p.layout, x.shape[1]
    )
  x = x.astype(compute_dtype)
  if resolve_kernel(kernel) == 'ffi':
    y = _kernel_calls(x, packed, scale)
    if low_rank is not None:
      y = y + jnp.matmul(*low_rank, preferred_element_type=jnp.float32)
    return to_output(y)
  matmul = functools.partial(_matmul, dtype=compute_dtype)
  args = (x, packed, scale, low_rank)
  if p.layout.batch_axes:
    y = jax.vmap(matmul)(*args)
  else:
    y = matmul(*jax.tree.map(lambda a: a[0], args))[None]
  return to_output(y)


def kernel_dot_general(
  lhs,
  p: PackedInt4,
  dimension_numbers,
  *,
  factors=None,
  input_scale=None,
  act_tile=None,
):
  """dot_general(lhs, deq(p)) + (lhs s A) B on lqer's int4 CPU kernel, one
  `ffi.int4_matmul` call per batch entry of the packed matrix.

  Args:
    lhs: the op's input, float32 or bfloat16 (read as given; the kernel
      multiplies bfloat16 input with AVX-512 BF16 dot products from 16
      tokens on, where the CPU has them).
    p: the packed weight.
    dimension_numbers: the op's, which `p` must fit (`fits`).
    factors: None, or (a, b, a_scale, b_scale) as `WithLqer` stores them:
      a (*batch, *contracting in kernel order, k), b (*batch, k, *output),
      float or integer values; a_scale (*batch, 1.., k) and b_scale
      (*batch, k, 1..) or None. Dequantized in the kernel.
    input_scale: None, or s (in,), the contracting axes flattened in kernel
      order (`WithLqer.input_scale`), for lhs = x / s already divided (as
      the XLA path divides it, so both quantize the same values): the
      branch reads x = lhs s (s goes to the kernel as its row_scale, so A
      is read in its stored dtype).
    act_tile: None: weight-only (float activations). An int: W4A8, lhs
      quantized to int8 per token (Qwix's dynamic absmax int8), one scale
      per `act_tile` consecutive packed rows, 0 for one per token.

  Returns:
    float32 of dot_general's output shape (`_as_matrix_input`).
  """
  x, to_output = _as_matrix_input(lhs, p, dimension_numbers)
  packed, scale = _weight_matrices(p)
  row_scale = None
  if factors is not None:
    factors = _factor_matrices(p.layout, *factors)
    if input_scale is not None:
      row_scale = _input_rows(p.layout, input_scale)
  return to_output(
    _kernel_calls(x, packed, scale, factors, act_tile, row_scale)
  )


def _rows_in_packed_order(layout, value, nb: int):
  """value (*nb batch axes, *contracting dims in kernel order, *rest) with
  its contracting axes permuted to `layout`'s row order (packed rows)."""
  kernel_order = tuple(sorted(layout.contracting_axes))
  perm = [nb + kernel_order.index(a) for a in layout.contracting_axes]
  end = nb + len(perm)
  return jnp.transpose(value, (*range(nb), *perm, *range(end, value.ndim)))


def _factor_matrices(layout, a, b, a_scale, b_scale):
  """Stored factors (`WithLqer`) -> a (nb, in, k) with rows in packed
  order, b (nb, k, out), a_scale and b_scale (nb, k) or None."""
  nb = math.prod(layout.batch_shape)
  k = a.shape[-1]
  a = _rows_in_packed_order(layout, a, len(layout.batch_axes))
  flat = lambda s: None if s is None else s.reshape(nb, k)
  return (
    a.reshape(nb, layout.in_size, k),
    b.reshape(nb, k, layout.out_size),
    flat(a_scale),
    flat(b_scale),
  )


def _input_rows(layout, s):
  """The input scale s (the contracting axes') as (in,) float32 in packed
  row order."""
  dims = [layout.shape[ax] for ax in sorted(layout.contracting_axes)]
  rows = _rows_in_packed_order(layout, s.reshape(dims), 0).reshape(-1)
  return rows.astype(jnp.float32)


def _kernel_calls(
  x, packed, scale, factors=None, act_tile=None, row_scale=None
):
  """ffi.int4_matmul per batch entry: x (nb, tokens, in), packed (nb, in,
  out / 2), scale (nb, groups, out), factors (a, b, a_scale, b_scale) per
  entry or None, row_scale (in,) for every entry's branch or None; float32
  (nb, tokens, out)."""
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    x = x.astype(jnp.float32)

  def call(x, packed, scale, factors):
    a, b, a_scale, b_scale = factors or (None,) * 4
    return ffi.int4_matmul(
      x,
      packed,
      scale,
      a,
      b,
      a_scale=a_scale,
      b_scale=b_scale,
      act_bits=None if act_tile is None else 8,
      act_tile=act_tile or None,
      row_scale=row_scale,
    )

  if x.shape[0] == 1:
    return call(*jax.tree.map(lambda v: v[0], (x, packed, scale, factors)))[
      None
    ]
  return jax.vmap(call)(x, packed, scale, factors)
