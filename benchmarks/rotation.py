"""Online cost of the Hadamard rotation (LqerRule(rotate='hadamard')).

A rotated weight multiplies the rotated input: y = (x H)(Hᵀ W). Per token
the rotation costs O(n log b) (`lqer.core.rotation.rotate`: signs, then a
fast Walsh-Hadamard transform of each b-wide block), the matmul O(n m).
Times, jitted, median after warm-up, float32 on this backend:

* `rotate`: x -> x H alone, and `x @ W`: the float matmul alone;
* W4A4 layer: a Dense under `LqerProvider` (float32 compute, as `lqer
  eval` runs it; int4 g128 weight, int4
  per-token activations, QERA rank 32), unrotated and rotated: what the
  rotation adds to the quantized op as `lqer eval --rotate` runs it.

Shapes: SmolLM2's (576 -> 1536, 1536 -> 576: blocks 64 and 512) and a
7B-shaped MLP's (4096 -> 11008, 11008 -> 4096: blocks 4096 and 256).

    python benchmarks/rotation.py [--tokens 1 64 512] [--repeats 20]
"""

import argparse
import statistics
import time

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

import lqer
from lqer.core import rotation

SHAPES = [(576, 1536), (1536, 576), (4096, 11008), (11008, 4096)]


def _median_ms(fn, args, repeats):
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _layer_ms(n_in, n_out, x, rotate, repeats):
  """Median ms of a W4A4 QERA r32 Dense, rotated or not (random weights;
  statistics from x itself: only the cost is measured)."""
  model = nn.Dense(n_out, use_bias=False)
  fp = model.init(jax.random.key(0), x[:1])['params']
  rules = [
    lqer.LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      act_qtype=jnp.int4,
      tile_size=128 if n_in % 128 == 0 else None,
      rank=32,
      method='qera',
      rotate=rotate,
    )
  ]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  stats = lqer.calibrate(cal, fp, [(x,)])
  qmodel = qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=jnp.float32)
  )
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x[:1])['params']
  params = lqer.lqer_quantize_params(fp, abstract, calibration=stats)
  apply = jax.jit(lambda p, v: qmodel.apply({'params': p}, v))
  return _median_ms(apply, (params, x), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--tokens', type=int, nargs='+', default=[1, 64, 512])
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  print(f'# benchmarks/rotation.py, {jax.devices()[0].platform}')
  print(
    '| in -> out | block | tokens | rotate ms | x @ W ms | rotate / matmul'
    ' | W4A4 ms | W4A4 +rot ms | added |'
  )
  print('|' + '---|' * 9)
  rotate = jax.jit(rotation.rotate)
  matmul = jax.jit(jnp.matmul)
  for n_in, n_out in SHAPES:
    block = rotation.default_block(n_in)
    signs = rotation.random_signs(0, n_in, block)
    w = jax.random.normal(jax.random.key(1), (n_in, n_out)) / np.sqrt(n_in)
    for t in args.tokens:
      x = jax.random.normal(jax.random.key(2), (t, n_in))
      rot = _median_ms(rotate, (x, signs), args.repeats)
      mm = _median_ms(matmul, (x, w), args.repeats)
      # (1, tokens, in): XLA:CPU refuses Qwix's per-channel int4 dot of a
      # 2-D input ('custom element sizes'), as SmolLM2's (batch, seq) runs.
      plain = _layer_ms(n_in, n_out, x[None], None, args.repeats)
      rotated = _layer_ms(n_in, n_out, x[None], 'hadamard', args.repeats)
      print(
        f'| {n_in} -> {n_out} | {block} | {t} | {rot:.3f} | {mm:.3f} |'
        f' {rot / mm:.2f} | {plain:.3f} | {rotated:.3f} |'
        f' {(rotated / plain - 1) * 100:+.0f} % |',
        flush=True,
      )


if __name__ == '__main__':
  main()
