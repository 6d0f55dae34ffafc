"""Weight-only quantized matmul, x deq(Wq), faster and leaner than Qwix's.

Qwix's weight-only `dot_general` dequantizes the whole weight to float32 in
its own fusion and runs a float32 dot; XLA hoists those dequantizations, so
a jitted forward holds a float32 copy of every weight at once. Here:

* an `optimization_barrier` ties the weight to the layer's input, so its
  dequantization cannot be scheduled before the layer runs: one layer's
  dequantized weight is live at a time;
* the weight is dequantized to `compute_dtype` (bfloat16 by default: int4 /
  int8 codes are exact in it, and the scale product is rounded once to 8
  bits of mantissa) and multiplied with the activation in that dtype with
  float32 accumulation (`preferred_element_type`), which uses the bf16 dot
  units of CPUs (AVX512-BF16 / AMX), GPUs and TPUs.

Supported: symmetric or asymmetric integer / float8 / nf4 QArrays of any
tiling, any dot_general dimension numbers. `None` from `supports` means the
caller should use Qwix's own path (activation quantization).
"""

import jax
import jax.numpy as jnp
from qwix._src.core import qarray


def weight_only_dot_general(lhs, q: qarray.QArray, dimension_numbers,
                            compute_dtype=jnp.bfloat16):
  """lhs @ deq(q) with dequantization at use, float32 accumulation.

  Returns float32 of dot_general's output shape.
  """
  lhs, q = jax.lax.optimization_barrier((lhs, q))
  scale = q.scale.astype(compute_dtype)
  q = q.replace(scale=scale, zero_point=q.zero_point)
  w = qarray.dequantize(q)
  return jax.lax.dot_general(lhs.astype(compute_dtype), w, dimension_numbers,
                             preferred_element_type=jnp.float32)
