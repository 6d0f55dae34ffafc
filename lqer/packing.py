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

Param bytes do not change (0.5 byte per weight). `pack_params` converts a
quantized tree once, after `lqer_quantize_params` (or a checkpoint load);
`LqerProvider` then runs `packed_dot_general` on those weights.
"""

import math

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from lqer import layout as layout_lib
from lqer.weight import WithLqer

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
  """int4 kernel as an (in, out) matrix of uint8 pairs (j, j + out / 2).

  Attributes:
    packed: uint8 (in, out // 2); `in` flattens the contracting axes.
    scale: (groups, out) float; `in / groups` consecutive rows share one.
    shape: the original kernel shape (*contracting_dims, *output_dims).
  """

  packed: jax.Array
  scale: jax.Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

  ndim = property(lambda self: len(self.shape))
  dtype = property(lambda self: self.scale.dtype)


def _contiguous_groups(scale_shape, in_shape) -> bool:
  """Whether the scale's contracting dims group the flattened rows into
  contiguous runs: full along leading axes, tiled along one, 1 after it."""
  axis = 0
  while axis < len(in_shape) and scale_shape[axis] == in_shape[axis]:
    axis += 1
  return all(s == 1 for s in scale_shape[axis + 1:len(in_shape)])


def unpackable_reason(q: qarray.QArray, layout) -> str | None:
  """Why `q` cannot be packed (None if it can)."""
  if not isinstance(q, qarray.QArray) or q.qvalue.dtype != jnp.int4:
    return 'not an int4 QArray'
  if q.zero_point is not None:
    return 'asymmetric (has a zero point)'
  ncontract = len(layout.contracting_axes)
  if layout.contracting_axes != tuple(range(ncontract)) or layout.batch_axes:
    return 'kernel does not contract on its leading axes'
  if layout.out_size % 2:
    return f'odd output size {layout.out_size}'
  if any(s not in (1, d) for s, d in zip(q.scale.shape[ncontract:],
                                         q.shape[ncontract:])):
    return 'scale tiled along an output axis'
  if not _contiguous_groups(q.scale.shape, q.shape[:ncontract]):
    return 'scale groups are not contiguous rows'
  return None


def pack(q: qarray.QArray, ncontract: int = 1) -> PackedInt4:
  """Packs an int4 QArray whose kernel contracts on its `ncontract` leading
  axes (see module doc and `unpackable_reason`)."""
  rows = math.prod(q.shape[:ncontract])
  out = q.qvalue.size // rows
  groups = math.prod(q.scale.shape[:ncontract])
  scale = jnp.broadcast_to(q.scale, (*q.scale.shape[:ncontract],
                                     *q.shape[ncontract:]))
  nibbles = (q.qvalue.reshape(rows, 2, out // 2).astype(jnp.int8)
             & 15).astype(jnp.uint8)
  packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
  return PackedInt4(packed=packed, scale=scale.reshape(groups, out),
                    shape=tuple(q.shape))


def _layout(weight: ptq.WithAux) -> layout_lib.KernelLayout:
  if isinstance(weight, WithLqer):
    return weight.layout
  return layout_lib.KernelLayout.from_channelwise_axes(
      tuple(weight.array.shape), weight.how.channelwise_axes)


def _packed(leaf):
  """`leaf` with its array packed, or unchanged if it cannot be."""
  if not isinstance(leaf, ptq.WithAux) or isinstance(leaf.array, PackedInt4):
    return leaf
  layout = _layout(leaf)
  if unpackable_reason(leaf.array, layout) is not None:
    return leaf
  ncontract = len(layout.contracting_axes)
  return leaf.replace(array=jax.jit(pack, static_argnums=1)(leaf.array,
                                                            ncontract))


def pack_params(params):
  """Returns `params` with every packable int4 weight packed.

  `params` is a Linen params tree or an NNX module (packed in place: NNX
  keeps each weight's arrays as separate `nnx.Param`s). Weights that cannot
  be packed (other qtypes, zero points, einsum batch axes, contracting axes
  not leading, odd output size) keep the generic dequantize-at-use path.
  """
  if isinstance(params, nnx.Module):
    for _, module in nnx.iter_graph(params):
      if not isinstance(module, nnx.Module):
        continue
      for name, value in list(vars(module).items()):
        if isinstance(value, ptq.WithAux):
          unboxed = jax.tree.map(flax_util.unbox, value)
          new = _packed(unboxed)
          if new is not unboxed:
            setattr(module, name, jax.tree.map(nnx.Param, new))
    return params
  return jax.tree.map(_packed, params,
                      is_leaf=lambda x: isinstance(x, ptq.WithAux))


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
  return (jax.lax.shift_right_arithmetic(jax.lax.shift_left(b, four), four),
          jax.lax.shift_right_arithmetic(b, four))


def _dequantize(nibbles, scale, dtype):
  """w[i, j] = q[i, j] * scale[i // (rows / groups), j] for q (rows, cols)
  and scale (groups, cols)."""
  rows, cols = nibbles.shape
  groups = scale.shape[0]
  w = (nibbles.astype(dtype).reshape(groups, rows // groups, cols)
       * scale.astype(dtype)[:, None])
  return w.reshape(rows, cols)


def _dot(x, w):
  """x @ w accumulated in float32; TOKEN_CHUNK rows per dot when x has
  more than TOKEN_CHUNK and fewer than CHUNK_BELOW rows."""
  tokens = x.shape[0]
  if TOKEN_CHUNK < tokens < CHUNK_BELOW:
    return jnp.concatenate(
        [jnp.dot(x[r:r + TOKEN_CHUNK], w, preferred_element_type=jnp.float32)
         for r in range(0, tokens, TOKEN_CHUNK)], 0)
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _matvec_block_rows(group_rows: int) -> int:
  """Rows per block of the one-token path: whole scale groups, or a
  divisor of one group, close to MATVEC_BLOCK_ROWS."""
  if group_rows <= MATVEC_BLOCK_ROWS:
    return group_rows * (MATVEC_BLOCK_ROWS // group_rows)
  return max(d for d in range(1, MATVEC_BLOCK_ROWS + 1) if group_rows % d == 0)


def _by_row_blocks(x, p: PackedInt4, dtype):
  """x (1, rows) @ deq(p), one block of rows at a time, summed."""
  rows, half = p.packed.shape
  group_rows = rows // p.scale.shape[0]
  step = _matvec_block_rows(group_rows)
  sums = [None, None]
  link = x
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    scale = (p.scale[r0 // group_rows:-(-r1 // group_rows)]
             + unfoldable_zero(link, p.scale.dtype))
    xr = x[:, r0:r1]
    for i, nibbles in enumerate(_signed_nibbles(p.packed[r0:r1])):
      y = _dot(xr, _dequantize(nibbles, scale[:, i * half:(i + 1) * half],
                               dtype))
      sums[i] = y if sums[i] is None else sums[i] + y
    link = sums[1]
  return jnp.concatenate(sums, -1)


def _by_column_blocks(x, p: PackedInt4, dtype, low_rank):
  """x @ deq(p) [+ xa @ b], one cache-sized block of columns at a time."""
  rows, half = p.packed.shape
  width = max(1, BLOCK_BYTES // (rows * 2 * jnp.dtype(dtype).itemsize),
              -(-half // MAX_BLOCKS))
  halves = ([], [])
  link = x
  for c0 in range(0, half, width):
    c1 = min(half, c0 + width)
    zero = unfoldable_zero(link, p.scale.dtype)
    for nibbles, out, offset in zip(_signed_nibbles(p.packed[:, c0:c1]),
                                    halves, (0, half)):
      scale = p.scale[:, offset + c0:offset + c1] + zero
      y = _dot(x, _dequantize(nibbles, scale, dtype))
      if low_rank is not None:
        xa, b = low_rank
        y = y + jnp.dot(xa, b[:, offset + c0:offset + c1],
                        preferred_element_type=jnp.float32)
      out.append(y)
    link = halves[1][-1]
  return jnp.concatenate(halves[0] + halves[1], -1)


def packed_dot_general(lhs, p: PackedInt4, dimension_numbers, compute_dtype,
                       low_rank=None):
  """lhs @ deq(p) [+ xa @ b], dequantizing one cache-sized block at a time.

  low_rank: optional (xa (tokens, k), b (k, out)) float32, the LQER branch.
  One token (a matrix-vector product): blocks of MATVEC_BLOCK_ROWS rows,
  partial products summed, branch added once. More tokens: blocks of
  columns, the branch added block by block so its full-size output is never
  materialized. Each block's dequantization depends on the previous block's
  output (a zero XLA cannot fold), so XLA keeps one block live instead of
  hoisting all. Returns float32 of shape (*lhs non-contracting, *kernel
  output dims).
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  ncontract = len(rhs_c)
  if tuple(rhs_c) != tuple(range(ncontract)) or lhs_b or rhs_b:
    raise ValueError(
        f'packed int4 kernel {p.shape}: unsupported dimension numbers'
        f' {dimension_numbers} (contract on the leading kernel axes only)')
  rows = p.packed.shape[0]
  x = jnp.moveaxis(lhs, lhs_c, range(lhs.ndim - ncontract, lhs.ndim))
  lead = x.shape[:-ncontract]
  x = x.reshape(-1, rows).astype(compute_dtype)
  if x.shape[0] == 1:
    y = _by_row_blocks(x, p, compute_dtype)
    if low_rank is not None:
      xa, b = low_rank
      y = y + jnp.dot(xa, b, preferred_element_type=jnp.float32)
  else:
    y = _by_column_blocks(x, p, compute_dtype, low_rank)
  return y.reshape(*lead, *p.shape[ncontract:])
