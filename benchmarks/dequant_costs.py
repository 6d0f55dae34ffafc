"""Per-element cost of dequantizing an int4 weight on this backend.

Times, jitted, median after warm-up, for one (2048, 5632) int4 weight with
per-group-128 scales: Qwix's dequantization (s4 -> float32 times scale, the
`dequantize` lqer's unpacked path runs), the same weight read through
`lqer.pack_params`' uint8 pairs (the packed path's per-block work), and a
plain float32 copy of the result size for scale. Reports ns per weight.

    python benchmarks/dequant_costs.py [--repeats 50]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import qwix
from qwix._src.core import qarray

from lqer.quant import packing

ROWS, COLS, GROUP = 2048, 5632, 128


def _median_seconds(fn, args, repeats):
  fn = jax.jit(fn)
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _unpack(p: packing.PackedInt4):
  """The packed path's dequantization (one block = the whole weight)."""
  return [
    packing._dequantize(
      nibbles, p.scale[:, i * (COLS // 2) : (i + 1) * (COLS // 2)], jnp.float32
    )
    for i, nibbles in enumerate(packing._signed_nibbles(p.packed))
  ]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=50)
  args = parser.parse_args()
  w = jax.random.normal(jax.random.key(0), (ROWS, COLS))
  q = qwix.quantize(w, jnp.int4, channelwise_axes=[1], tiled_axes={0: GROUP})
  packed = packing.pack(q)
  rows = {
    'Qwix dequantize (s4 -> f32 * scale)': (qarray.dequantize, (q,)),
    'packed uint8 pairs -> f32 * scale': (_unpack, (packed,)),
    'float32 copy (x * 2) of the same size': (lambda a: a * 2, (w,)),
  }
  print(f'devices: {jax.devices()}')
  print('| operation | ms | ns / weight |')
  print('|---|---|---|')
  for name, (fn, fn_args) in rows.items():
    secs = _median_seconds(fn, fn_args, args.repeats)
    print(f'| {name} | {secs * 1e3:.2f} | {secs / (ROWS * COLS) * 1e9:.3f} |')


if __name__ == '__main__':
  main()
