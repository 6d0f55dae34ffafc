"""Bit accounting: bits of a qtype, of a factor rank, of a stored weight.

One home for every count the rule validation, the report, rank allocation
and the CLI print, so a bits-per-weight figure means the same everywhere:

    bits per weight = (b n + bits of scales, zero points, input scales,
                       A, B and their scales) / n

for a weight of n values at b bits, each array counted as stored (int4
values and factors: 4 bits, although NumPy stores them in a byte).
"""

import math

import jax.numpy as jnp
import numpy as np

from lqer import _qwix
from lqer.quant import packing
from lqer.quant.weight import WithLqer

INT_QTYPES = ('int2', 'int3', 'int4', 'int5', 'int6', 'int7', 'int8')
# Logical bits of Qwix's string qtypes (the microscaling formats carry their
# shared exponents as Qwix scales, counted separately).
_STRING_QTYPE_BITS = {'nf4': 4, 'mxfp4': 4, 'nvfp4': 4, 'mxfp8': 8}
# Arrays of these dtypes hold 4 logical bits per value.
_NIBBLE_DTYPES = ('int4', 'uint4')


def qtype_name(qtype) -> str:
  """A Qwix qtype by name: jnp.int4 and 'int4' -> 'int4'."""
  return str(getattr(qtype, '__name__', qtype))


def qtype_bits(qtype) -> int:
  """Logical bits per value of a Qwix qtype.

  Args:
    qtype: a dtype or Qwix's name of one.

  Returns:
    jnp.int4 / 'int4' -> 4, 'int3' -> 3 (Qwix stores it in an int4
    container), 'nf4' / 'mxfp4' / 'nvfp4' -> 4, 'mxfp8' /
    jnp.float8_e4m3fn -> 8.
  """
  name = qtype_name(qtype)
  if name in _STRING_QTYPE_BITS:
    return _STRING_QTYPE_BITS[name]
  if name in INT_QTYPES:
    return int(name[3:])
  dtype = np.dtype(qtype)
  if np.issubdtype(dtype, np.integer):
    return np.iinfo(dtype).bits
  return dtype.itemsize * 8


def weight_bits(q) -> int:
  """Bits per value of a QArray's qtype (a PackedInt4: 4)."""
  if isinstance(q, packing.PackedInt4):
    return 4
  return qtype_bits(q.qtype)


def array_bits(x) -> int:
  """Stored bits of an array (None: 0), int4 counted at 4 bits a value."""
  if x is None:
    return 0
  name = jnp.dtype(x.dtype).name
  per_value = (
    qtype_bits(name)
    if name in _NIBBLE_DTYPES
    else jnp.dtype(x.dtype).itemsize * 8
  )
  return x.size * per_value


def component_bits(layout, rule) -> int:
  """Stored bits of one rank of a weight's A B.

  Args:
    layout: the weight's `KernelLayout`.
    rule: its `LqerRule` (factor_qtype, factor_dtype).

  Returns:
    batch (in + out) values at factor_qtype's bits (else factor_dtype's),
    plus a scale for the column of A and one for the row of B when the
    factors are quantized.
  """
  batch = math.prod(layout.batch_shape)
  dtype_bits = np.dtype(rule.factor_dtype).itemsize * 8
  value_bits = (
    dtype_bits if rule.factor_qtype is None else qtype_bits(rule.factor_qtype)
  )
  bits = batch * (layout.in_size + layout.out_size) * value_bits
  if rule.factor_qtype is not None:
    bits += 2 * batch * dtype_bits
  return bits


def bits_per_weight(w: _qwix.WithAux) -> float:
  """Stored bits of a quantized weight (and its factors) per weight value.

  Args:
    w: a Qwix `WithAux` or `WithLqer` leaf, packed or not.

  Returns:
    (b n + bits of scales, zero points, input scales, A, B and their
    scales) / n.
  """
  q = packing.as_qarray(w.array)
  n = q.qvalue.size
  bits = (
    qtype_bits(q.qtype) * n + array_bits(q.scale) + array_bits(q.zero_point)
  )
  if isinstance(w, WithLqer):
    bits += sum(
      array_bits(getattr(w, f))
      for f in ('a', 'b', 'a_scale', 'b_scale', 'input_scale')
    )
  return bits / n
