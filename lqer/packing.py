"""Int4 kernels packed two per byte, for a faster CPU matmul.

XLA:CPU reads an `s4` array nibble by nibble (about 0.3-0.5 ns per element
on the benchmark machine), which makes dequantizing an int4 weight cost as
much as the float matmul it replaces. A packed weight holds the same bits as
plain uint8 bytes, the low nibble from the left half of the columns and the
high nibble from the right half, p[i, j] = (q[i, j] & 15) | (q[i, j + h] &
15) << 4 with h = out / 2, for the kernel viewed as an (in, out) matrix, so
dequantization is two vectorizable byte operations per element pair, each
with a contiguous run of scales and output columns:

    q[i, j]   = ((p ^ 0x88) & 15) - 8,     q[i, j + h] = ((p ^ 0x88) >> 4) - 8

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

# Bytes of one dequantized block of columns; keeps the block in cache
# (tuned with benchmarks/inference.py on a 2-core AVX-512 CPU).
BLOCK_BYTES = 2 << 20
MAX_BLOCKS = 16


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


def packed_dot_general(lhs, p: PackedInt4, dimension_numbers, compute_dtype,
                       low_rank=None):
  """lhs @ deq(p) [+ xa @ b], one cache-sized block of columns at a time.

  low_rank: optional (xa (tokens, k), b (k, out)) float32, the LQER branch,
  added block by block so its full-size output is never materialized.

  Each block's dequantization depends on the previous block's output (a zero
  XLA cannot fold), so XLA keeps one block live instead of hoisting all.
  Returns float32 of shape (*lhs non-contracting, *kernel output dims).
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  ncontract = len(rhs_c)
  if tuple(rhs_c) != tuple(range(ncontract)) or lhs_b or rhs_b:
    raise ValueError(
        f'packed int4 kernel {p.shape}: unsupported dimension numbers'
        f' {dimension_numbers} (contract on the leading kernel axes only)')
  rows, half = p.packed.shape
  groups = p.scale.shape[0]
  x = jnp.moveaxis(lhs, lhs_c, range(lhs.ndim - ncontract, lhs.ndim))
  lead = x.shape[:-ncontract]
  x = x.reshape(-1, rows).astype(compute_dtype)
  itemsize = jnp.dtype(compute_dtype).itemsize
  width = max(1, BLOCK_BYTES // (rows * 2 * itemsize),
              -(-half // MAX_BLOCKS))
  halves = ([], [])
  link = lhs
  for c0 in range(0, half, width):
    c1 = min(half, c0 + width)
    zero = unfoldable_zero(link, p.scale.dtype)
    byte = p.packed[:, c0:c1] ^ jnp.uint8(0x88)
    for nibble, out, offset in ((byte & jnp.uint8(15), halves[0], 0),
                                (byte >> jnp.uint8(4), halves[1], half)):
      scale = p.scale[:, offset + c0:offset + c1] + zero
      w = ((nibble.astype(compute_dtype) - 8).reshape(groups, -1, c1 - c0)
           * scale.astype(compute_dtype)[:, None])
      y = jnp.dot(x, w.reshape(rows, c1 - c0),
                  preferred_element_type=jnp.float32)
      if low_rank is not None:
        xa, b = low_rank
        y = y + jnp.dot(xa, b[:, offset + c0:offset + c1],
                        preferred_element_type=jnp.float32)
      out.append(y)
    link = halves[1][-1]
  y = jnp.concatenate(halves[0] + halves[1], -1)
  return y.reshape(*lead, *p.shape[ncontract:])
