"""Weight-only quantized matmul: x deq(Wq), dequantized at its use.

Qwix's weight-only `dot_general` dequantizes the whole weight to float32 in
its own fusion and runs a float32 dot; XLA hoists those dequantizations to
the start of the program, so a jitted forward holds a float32 copy of every
weight at once (temporary memory ~1.0x the float weights). Here the
dequantization is tied to the layer's input by a data dependency (a zero
XLA cannot fold; `optimization_barrier` is dropped before scheduling on
XLA:CPU), so about one layer's dequantized weights are live at a time.

Compute dtype ('auto', chosen by measurement with benchmarks/inference.py):
on CPU, bfloat16 (bf16 x bf16 -> f32 dots, which XLA:CPU runs through
YNNPACK) for weights of at most 4 bits when a call multiplies at least
`BF16_MIN_TOKENS` rows; float32 below that (XLA:CPU converts a bf16
matrix-vector dot to f32 first, so bf16 buys nothing there) and for wider
qtypes (bf16 rounding of the activations and scales, ~2^-9, is comparable
to int8's own error and would undo most of its reconstruction). Other
backends: float32 (not measured here). float32 gives Qwix's numbers
exactly.
"""

import warnings

import jax
import jax.numpy as jnp
import qwix

from lqer.quant import bits
from lqer.quant import packing

BF16_MIN_TOKENS = 64


def compute_dtype_for(requested, tokens: int, weight_bits: int = 4):
  """The dtype a weight of `weight_bits` is dequantized to for a call with
  `tokens` rows."""
  if requested != 'auto':
    return requested
  if (
    jax.default_backend() == 'cpu'
    and tokens >= BF16_MIN_TOKENS
    and weight_bits <= 4
  ):
    return jnp.bfloat16
  return jnp.float32


def weight_only_dot_general(
  lhs,
  q,
  dimension_numbers,
  compute_dtype='auto',
  low_rank=None,
  int4_kernel='auto',
):
  """lhs @ deq(q) with dequantization at use, float32 accumulation.

  `q` is a Qwix QArray or a `packing.PackedInt4`; `low_rank` (packed only):
  (xa, b) added as xa @ b inside the blocked matmul (see
  `packing.packed_dot_general` for their shapes); int4_kernel: the packed
  matmul, 'auto' / 'ffi' / 'xla' (`packing.resolve_kernel`). Returns float32
  of dot_general's output shape.
  """
  if lhs.size == 0:  # no tokens: the empty output, as a float matmul gives
    out = jax.eval_shape(
      lambda: jax.lax.dot_general(
        lhs, jax.ShapeDtypeStruct(q.shape, jnp.float32), dimension_numbers
      )
    )
    return jnp.zeros(out.shape, jnp.float32)
  (lhs_c, _), (lhs_b, _) = dimension_numbers
  contracted = 1
  for axis in (*lhs_c, *lhs_b):
    contracted *= lhs.shape[axis]
  dtype = compute_dtype_for(
    compute_dtype, lhs.size // max(contracted, 1), bits.weight_bits(q)
  )
  if isinstance(q, packing.PackedInt4):
    # With a branch (an LQER weight, whose layout has its batch axes) a
    # misfit is an error, raised there.
    if low_rank is not None or packing.fits(q, dimension_numbers):
      return packing.packed_dot_general(
        lhs, q, dimension_numbers, dtype, low_rank, int4_kernel
      )
    q = _unpacked(q, dimension_numbers)
  # Tied to the layer's input, the dequantization is not hoisted.
  zero = packing.unfoldable_zero(lhs, dtype)
  q = q.replace(scale=q.scale.astype(dtype) + zero, zero_point=q.zero_point)
  w = qwix.dequantize(q)
  return jax.lax.dot_general(
    lhs.astype(dtype), w, dimension_numbers, preferred_element_type=jnp.float32
  )


def _unpacked(p: packing.PackedInt4, dimension_numbers) -> qwix.QArray:
  """`p` as a QArray, with a warning: a plain Qwix weight of an einsum with
  batch axes was packed as if they were output axes (its channelwise axes
  cannot tell them apart), so this call takes the generic path."""
  warnings.warn(
    f'lqer: packed int4 kernel {p.shape} is used with einsum batch axes'
    f' {tuple(dimension_numbers[1][1])} its packed layout lacks (a plain'
    ' Qwix weight records none); it is dequantized whole, the generic path'
    ' (an LqerRule with a rank records them and keeps it packed).',
    stacklevel=3,
  )
  return packing.unpack(p)
