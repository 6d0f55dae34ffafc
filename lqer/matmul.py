"""Weight-only quantized matmul: x deq(Wq), dequantized at its use.

Qwix's weight-only `dot_general` dequantizes the whole weight to float32 in
its own fusion and runs a float32 dot; XLA hoists those dequantizations to
the start of the program, so a jitted forward holds a float32 copy of every
weight at once (temporary memory ~1.0x the float weights). Here the
dequantization is tied to the layer's input by a data dependency (a zero
XLA cannot fold; `optimization_barrier` is dropped before scheduling on
XLA:CPU), so about one layer's dequantized weights are live at a time.

`compute_dtype` float32 gives Qwix's numbers; bfloat16 rounds the
dequantized weight and the activation to bf16 (float32 accumulation), which
halves the transient copy and uses bf16 dot units where the backend has
them (XLA:CPU 0.10 upcasts bf16 dots to f32, so it is no faster there).
"""

import jax
import jax.numpy as jnp
from qwix._src.core import qarray


def weight_only_dot_general(lhs, q: qarray.QArray, dimension_numbers,
                            compute_dtype=jnp.bfloat16):
  """lhs @ deq(q) with dequantization at use, float32 accumulation.

  Returns float32 of dot_general's output shape.
  """
  # A zero that XLA cannot fold ties the dequantization to the layer's
  # input, so it is not hoisted to the start of the program.
  # (optimization_barrier is dropped before scheduling on XLA:CPU.)
  zero = jnp.zeros((), compute_dtype) * lhs.reshape(-1)[0].astype(
      compute_dtype)
  scale = q.scale.astype(compute_dtype) + zero
  q = q.replace(scale=scale, zero_point=q.zero_point)
  w = qarray.dequantize(q)
  return jax.lax.dot_general(lhs.astype(compute_dtype), w, dimension_numbers,
                             preferred_element_type=jnp.float32)
