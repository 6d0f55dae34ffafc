"""Jitted forward latency and memory: FP32, bf16, Qwix PTQ, LQER.

A Llama-shaped SwiGLU MLP stack (d=2048, ff=5632, 4 layers), int4 per-group
128, rank 32, bf16 factors. For batch x sequence 1x1, 1x128 and 8x128 it
times each variant (median of --repeats runs after warm-up, the variants
interleaved in one process) and reports the compiled forward's temporary
memory (`memory_analysis().temp_size_in_bytes`) against the FP32 weights'
bytes, and the param bytes as stored (int4 packed two per byte, i.e. the
bits of each dtype, not `nbytes`).

    python benchmarks/inference.py [--json FILE] [--layers 4] [--repeats 20]
"""

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

import lqer


class SwiGluStack(nn.Module):
  d: int
  ff: int
  layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                       name=f'{name}_{i}')
      h = nn.silu(dense(self.ff, 'gate')(x)) * dense(self.ff, 'up')(x)
      x = x + dense(self.d, 'down')(h)
    return x


def stored_bytes(tree) -> int:
  """Bytes as stored: bits of each leaf's dtype (int4 = 4 bits)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    bits = 4 if jnp.dtype(leaf.dtype).name in ('int4', 'uint4') else (
        jnp.dtype(leaf.dtype).itemsize * 8)
    total += leaf.size * bits // 8
  return total


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--d', type=int, default=2048)
  p.add_argument('--ff', type=int, default=5632)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--shapes', default='1x1,1x128,8x128')
  p.add_argument('--json')
  args = p.parse_args()
  shapes = [tuple(map(int, s.split('x'))) for s in args.shapes.split(',')]
  model = SwiGluStack(args.d, args.ff, args.layers)
  x0 = jnp.ones((1, 1, args.d))
  fp = jax.jit(model.init)(jax.random.key(0), x0)['params']
  fp_bytes = stored_bytes(fp)
  bf16_model = SwiGluStack(args.d, args.ff, args.layers, jnp.bfloat16)
  bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), fp)
  ptq_rules = [qwix.QuantizationRule(weight_qtype=jnp.int4, tile_size=128)]
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(ptq_rules))
  ptq = qwix.quantize_params(fp, jax.eval_shape(ptq_model.init,
                                                jax.random.key(0),
                                                x0)['params'])
  rules = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=128,
                         rank=args.rank)]
  variants = {
      'FP32': (model, fp),
      'bf16': (bf16_model, bf16),
      'Qwix PTQ int4': (ptq_model, ptq),
  }
  lqer_model = lambda cd: qwix.quantize_model(
      model, lqer.LqerProvider(rules, compute_dtype=cd))
  abstract = jax.eval_shape(lqer_model('auto').init, jax.random.key(0),
                            x0)['params']
  params = lqer.lqer_quantize_params(fp, abstract)
  packed = lqer.pack_params(params)
  ptq_lqer = qwix.quantize_model(model, lqer.LqerProvider(ptq_rules))
  variants.update({
      'LQER int4 (Qwix matmul)': (lqer_model(None), params),
      'LQER int4 (f32 at use)': (lqer_model(jnp.float32), params),
      'LQER int4 (auto)': (lqer_model('auto'), params),
      'PTQ int4 packed (auto)': (ptq_lqer, lqer.pack_params(ptq)),
      'LQER int4 packed (auto)': (lqer_model('auto'), packed),
  })
  results = []
  for b, t in shapes:
    x = jax.random.normal(jax.random.key(1), (b, t, args.d))
    fns = {}
    for name, (m, prm) in variants.items():
      xin = x.astype(jnp.bfloat16) if name == 'bf16' else x
      fn = jax.jit(lambda p, x, m=m: m.apply({'params': p}, x))
      compiled = fn.lower(prm, xin).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      for _ in range(3):
        jax.block_until_ready(fn(prm, xin))
      fns[name] = (fn, prm, xin, temp)
    times = {n: [] for n in fns}
    for _ in range(args.repeats):
      for name, (fn, prm, xin, _) in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(prm, xin))
        times[name].append(time.perf_counter() - start)
    fp_med = statistics.median(times['FP32'])
    ptq_med = statistics.median(times['Qwix PTQ int4'])
    # The branch's cost: each LQER variant against PTQ on the same matmul.
    same_path = {'LQER int4 (Qwix matmul)': 'Qwix PTQ int4',
                 'LQER int4 packed (auto)': 'PTQ int4 packed (auto)'}
    for name, (_, prm, _, temp) in fns.items():
      med = statistics.median(times[name])
      base = same_path.get(name)
      results.append({
          'shape': f'{b}x{t}', 'variant': name, 'median_ms': med * 1e3,
          'vs_fp32': med / fp_med, 'vs_ptq': med / ptq_med,
          'vs_same_path_ptq': (med / statistics.median(times[base])
                               if base else None),
          'temp_vs_fp32_weights': temp / fp_bytes,
          'param_bytes_vs_ptq': stored_bytes(prm) / stored_bytes(ptq),
          'param_bytes_vs_fp32': stored_bytes(prm) / fp_bytes})
  print(f'devices: {jax.devices()}')
  print('| shape | variant | median ms | vs FP32 | vs Qwix PTQ |'
        ' branch: vs PTQ on same matmul |'
        ' temp mem / FP32 weights | param bytes / PTQ | param bytes / FP32 |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in results:
    same = r['vs_same_path_ptq']
    print(f"| {r['shape']} | {r['variant']} | {r['median_ms']:.2f} |"
          f" {r['vs_fp32']:.2f} | {r['vs_ptq']:.2f} |"
          f" {'' if same is None else f'{same:.2f}'} |"
          f" {r['temp_vs_fp32_weights']:.2f} | {r['param_bytes_vs_ptq']:.3f} |"
          f" {r['param_bytes_vs_fp32']:.3f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
