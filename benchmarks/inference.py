"""Jitted forward latency and memory: FP32, bf16, Qwix PTQ, LQER.

A Llama-shaped SwiGLU MLP stack (d=2048, ff=5632, 4 layers), int4 per-group
128, rank 32, bf16 factors. For batch x sequence 1x1, 1x128 and 8x128 it
times each variant (median of --repeats runs after warm-up, the variants
interleaved in one process) and reports the compiled forward's temporary
memory (`memory_analysis().temp_size_in_bytes`) against the FP32 weights'
bytes, and the param bytes as stored (int4 packed two per byte, i.e. the
bits of each dtype, not `nbytes`).

    python benchmarks/inference.py [--json FILE] [--layers 4] [--repeats 20]
      [--variants REGEX]

Packed rows run on each matmul path: '(kernel)' is lqer's int4 CPU kernel
(`LqerProvider(int4_kernel='ffi')`: one FFI call per weight, the branch,
x / lam and int8 activation quantization inside it), '(XLA)' the blocked
XLA path (`int4_kernel='xla'`). The run first measures a STREAM-style read
bandwidth (the median time of summing a 256 MiB float32 array, split over
1 and over all cores, the faster taken) and prints, per row, the bytes the
forward reads (its params as stored, int4 at 4 bits) per second as a share
of it.

The MLP table also has W4A8 rows: PTQ with int8 dynamic activations and
SVDQuant (smoothing alpha 0.5, rank 32), each on Qwix's matmul and packed
(the kernel's W4A8 path; on XLA x / lam quantized and dequantized, then
the packed weight-only matmul).

`--model gemma-block`: one Gemma-3-270M-shaped decoder block (d 640, 4
query heads of dim 256, 1 KV head, gated MLP ff 2048), its kernels laid out
as Google's gemma library writes its einsums (q (N, D, H), kv (2, K, D, H),
out (N, H, D), gate/up (2, F, D)), with causal softmax attention; FP32, Qwix
PTQ int4, PTQ and LQER int4 packed (W4 g128 r32) on both paths at 1x1,
1x128 and 8x128:

    python benchmarks/inference.py --model gemma-block [--repeats 20]
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

import lqer


class SwiGluStack(nn.Module):
  """Llama-shaped SwiGLU MLP blocks (Dense kernels)."""

  d: int
  ff: int
  layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      dense = lambda n, name: nn.Dense(
        n, use_bias=False, dtype=self.dtype, name=f'{name}_{i}'
      )
      h = nn.silu(dense(self.ff, 'gate')(x)) * dense(self.ff, 'up')(x)
      x = x + dense(self.d, 'down')(h)
    return x


def stored_bytes(tree) -> int:
  """Bytes as stored: bits of each leaf's dtype (int4 = 4 bits)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    bits = (
      4
      if jnp.dtype(leaf.dtype).name in ('int4', 'uint4')
      else (jnp.dtype(leaf.dtype).itemsize * 8)
    )
    total += leaf.size * bits // 8
  return total


def causal_attention(q, k, v):
  """softmax(q k^T / sqrt(H)) v, causal, for q (B, T, N, H) and k, v
  (B, S, K, H): each of the K KV heads serves N / K query heads."""
  b, t, n, h = q.shape
  q = q.reshape(b, t, k.shape[2], -1, h)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k) / jnp.sqrt(h)
  logits = jnp.where(
    jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min
  )
  out = jnp.einsum('BKGTS,BSKH->BTKGH', jax.nn.softmax(logits, -1), v)
  return out.reshape(b, t, n, h)


class GemmaBlocks(nn.Module):
  """Gemma-3-270M-shaped decoder blocks with the gemma library's einsum
  kernel layouts: q (N, D, H) 'BTD,NDH->BTNH', kv (2, K, D, H)
  'BSD,CKDH->CBSKH', out (N, H, D) 'BTNH,NHD->BTD', gate and up as one
  (2, F, D) kernel '...D,NFD->...NF', down (F, D) '...F,FD->...D'. No RoPE,
  no KV cache."""

  d: int = 640
  ff: int = 2048
  layers: int = 1
  heads: int = 4
  kv_heads: int = 1
  head_dim: int = 256

  @nn.compact
  def __call__(self, x):
    n, k, d, h, f = self.heads, self.kv_heads, self.d, self.head_dim, self.ff
    for i in range(self.layers):
      einsum = lambda shape, eq, name: nn.Einsum(
        shape, eq, use_bias=False, name=f'{name}_{i}'
      )
      y = nn.RMSNorm(name=f'attn_norm_{i}')(x)
      q = einsum((n, d, h), 'BTD,NDH->BTNH', 'q')(y)
      key, value = einsum((2, k, d, h), 'BSD,CKDH->CBSKH', 'kv')(y)
      x = x + einsum((n, h, d), 'BTNH,NHD->BTD', 'out')(
        causal_attention(q, key, value)
      )
      y = nn.RMSNorm(name=f'mlp_norm_{i}')(x)
      gate, up = jnp.moveaxis(
        einsum((2, f, d), '...D,NFD->...NF', 'gating')(y), -2, 0
      )
      x = x + einsum((f, d), '...F,FD->...D', 'down')(nn.gelu(gate) * up)
    return x


def packed_models(model, ptq_rules, rules):
  """{'XLA' | 'kernel': (PTQ model, LQER model)} on packed weights."""
  out = {}
  for path, kernel in (('XLA', 'xla'), ('kernel', 'ffi')):
    make = lambda r, k=kernel: qwix.quantize_model(
      model, lqer.LqerProvider(r, int4_kernel=k)
    )
    out[path] = (make(ptq_rules), make(rules))
  return out


def mlp_variants(model, fp, x0, ptq_rules, rules):
  """FP32, bf16, Qwix PTQ and LQER on each matmul path (the MLP table)."""
  bf16_model = model.clone(dtype=jnp.bfloat16)
  bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), fp)
  ptq_model, ptq = ptq_variant(model, fp, x0, ptq_rules)
  lqer_model = lambda cd: qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=cd)
  )
  params = lqer_params(model, fp, x0, rules)
  packed_ptq, packed = lqer.pack_params(ptq), lqer.pack_params(params)
  variants = {
    'FP32': (model, fp),
    'bf16': (bf16_model, bf16),
    'Qwix PTQ int4': (ptq_model, ptq),
    'LQER int4 (Qwix matmul)': (lqer_model(None), params),
    'LQER int4 (f32 at use)': (lqer_model(jnp.float32), params),
    'LQER int4 (auto)': (lqer_model('auto'), params),
  }
  for path, (ptq_m, lqer_m) in packed_models(model, ptq_rules, rules).items():
    variants[f'PTQ int4 packed ({path})'] = (ptq_m, packed_ptq)
    variants[f'LQER int4 packed ({path})'] = (lqer_m, packed)
  return {**variants, **w4a8_variants(model, fp, x0, ptq_rules, rules)}


def w4a8_variants(model, fp, x0, ptq_rules, rules):
  """PTQ W4A8 and SVDQuant W4A8 (int8 dynamic activations, smoothing
  calibrated on random inputs), each on Qwix's matmul and packed on both
  paths."""
  act = lambda r, **kw: dataclasses.replace(r, act_qtype=jnp.int8, **kw)
  a8_ptq = [act(r) for r in ptq_rules]
  a8_rules = [act(r, method='svdquant') for r in rules]
  cal = qwix.quantize_model(
    model, lqer.LqerCalibrationProvider(a8_rules, second_moment=False)
  )
  x_cal = jax.random.normal(jax.random.key(2), (8, 128, x0.shape[-1]))
  _, stats = cal.apply(
    {'params': fp, **cal.init(jax.random.key(0), x0)},
    x_cal,
    mutable='quant_stats',
  )
  svdquant = qwix.quantize_model(
    model, lqer.LqerProvider(a8_rules, compute_dtype=None)
  )
  abstract = jax.eval_shape(svdquant.init, jax.random.key(0), x0)['params']
  params = lqer.lqer_quantize_params(
    fp, abstract, calibration=stats['quant_stats']
  )
  ptq_model, ptq = ptq_variant(model, fp, x0, a8_ptq)
  variants = {
    'Qwix PTQ W4A8': (ptq_model, ptq),
    'SVDQuant W4A8 (Qwix matmul)': (svdquant, params),
  }
  packed_ptq, packed = lqer.pack_params(ptq), lqer.pack_params(params)
  for path, (ptq_m, lqer_m) in packed_models(model, a8_ptq, a8_rules).items():
    variants[f'PTQ W4A8 packed ({path})'] = (ptq_m, packed_ptq)
    variants[f'SVDQuant W4A8 packed ({path})'] = (lqer_m, packed)
  return variants


def gemma_variants(model, fp, x0, ptq_rules, rules):
  """FP32, Qwix PTQ and PTQ / LQER packed on both paths (the Gemma block
  table)."""
  ptq_model, ptq = ptq_variant(model, fp, x0, ptq_rules)
  packed_ptq = lqer.pack_params(ptq)
  packed = lqer.pack_params(lqer_params(model, fp, x0, rules))
  variants = {'FP32': (model, fp), 'Qwix PTQ int4': (ptq_model, ptq)}
  for path, (ptq_m, lqer_m) in packed_models(model, ptq_rules, rules).items():
    variants[f'PTQ int4 packed ({path})'] = (ptq_m, packed_ptq)
    variants[f'LQER int4 packed ({path})'] = (lqer_m, packed)
  return variants


def ptq_variant(model, fp, x0, ptq_rules):
  """Qwix's PTQ model and params."""
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(ptq_rules))
  abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), x0)['params']
  return ptq_model, qwix.quantize_params(fp, abstract)


def lqer_params(model, fp, x0, rules):
  """LQER params (unpacked) for `rules`."""
  lqer_model = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = jax.eval_shape(lqer_model.init, jax.random.key(0), x0)['params']
  return lqer.lqer_quantize_params(fp, abstract)


def read_bandwidth(nbytes=256 << 20, repeats=9):
  """STREAM-style read bandwidth, bytes / s: the median time of summing a
  float32 array of `nbytes` (far beyond the caches), split into equal
  parts summed by 1 and by all cores' threads at once (NumPy releases the
  GIL), the faster of the two."""
  x = np.random.default_rng(0).standard_normal(nbytes // 4, np.float32)
  best = 0.0
  for threads in sorted({1, os.cpu_count() or 1}):
    parts = np.array_split(x, threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(np.sum, parts))  # warm-up
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        list(pool.map(np.sum, parts))
        times.append(time.perf_counter() - start)
    best = max(best, x.nbytes / statistics.median(times))
  return best


def measure(variants, shapes, d, repeats):
  """Per shape (batch, tokens): {variant: (median seconds, compiled temp
  bytes)}, the variants interleaved, after 3 warm-up calls each."""
  out = {}
  for b, t in shapes:
    x = jax.random.normal(jax.random.key(1), (b, t, d))
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
    for _ in range(repeats):
      for name, (fn, prm, xin, _) in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(prm, xin))
        times[name].append(time.perf_counter() - start)
    out[(b, t)] = {
      name: (statistics.median(times[name]), fns[name][3]) for name in fns
    }
  return out


SAME_PATH = {  # the branch's cost: each LQER variant against PTQ on its path
  'LQER int4 (Qwix matmul)': 'Qwix PTQ int4',
  'SVDQuant W4A8 (Qwix matmul)': 'Qwix PTQ W4A8',
  **{
    f'{lqer_name} packed ({path})': f'{ptq_name} packed ({path})'
    for path in ('XLA', 'kernel')
    for lqer_name, ptq_name in (
      ('LQER int4', 'PTQ int4'),
      ('SVDQuant W4A8', 'PTQ W4A8'),
    )
  },
}


def table_rows(timed, variants, fp_bytes, ptq, bandwidth):
  """One result dict per shape and variant: ratios vs FP32 and Qwix PTQ,
  and the params' bytes read per second as a share of `bandwidth`."""
  results = []
  for (b, t), by_name in timed.items():
    fp_med = by_name['FP32'][0]
    ptq_med = by_name.get('Qwix PTQ int4', (None,))[0]
    for name, (med, temp) in by_name.items():
      base = SAME_PATH.get(name)
      param_bytes = stored_bytes(variants[name][1])
      results.append(
        {
          'shape': f'{b}x{t}',
          'variant': name,
          'median_ms': med * 1e3,
          'vs_fp32': med / fp_med,
          'vs_ptq': None if ptq_med is None else med / ptq_med,
          'vs_same_path_ptq': (
            med / by_name[base][0] if base in by_name else None
          ),
          'bandwidth_share': param_bytes / med / bandwidth,
          'temp_vs_fp32_weights': temp / fp_bytes,
          'param_bytes_vs_ptq': param_bytes / stored_bytes(ptq),
          'param_bytes_vs_fp32': param_bytes / fp_bytes,
        }
      )
  return results


def print_table(results, bandwidth):
  print(f'devices: {jax.devices()}')
  print(
    f'read bandwidth (STREAM-style sum of 256 MiB float32):'
    f' {bandwidth / 1e9:.1f} GB/s'
  )
  print(
    '| shape | variant | median ms | vs FP32 | vs Qwix PTQ |'
    ' branch: vs PTQ on same matmul | param bytes read / s, % of bandwidth |'
    ' temp mem / FP32 weights | param bytes / PTQ | param bytes / FP32 |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  fmt = lambda v, f: '' if v is None else format(v, f)
  for r in results:
    print(
      f'| {r["shape"]} | {r["variant"]} | {r["median_ms"]:.2f} |'
      f' {r["vs_fp32"]:.2f} | {fmt(r["vs_ptq"], ".2f")} |'
      f' {fmt(r["vs_same_path_ptq"], ".2f")} |'
      f' {100 * r["bandwidth_share"]:.0f} |'
      f' {r["temp_vs_fp32_weights"]:.2f} | {r["param_bytes_vs_ptq"]:.3f} |'
      f' {r["param_bytes_vs_fp32"]:.3f} |'
    )


MODELS = {  # --model: (module, variants, default d, ff, layers, shapes)
  'mlp': (SwiGluStack, mlp_variants, 2048, 5632, 4, '1x1,1x128,8x128'),
  'gemma-block': (
    GemmaBlocks,
    gemma_variants,
    640,
    2048,
    1,
    '1x1,1x128,8x128',
  ),
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', choices=MODELS, default='mlp')
  p.add_argument('--d', type=int, help='model width (default per --model)')
  p.add_argument('--ff', type=int, help='MLP width (default per --model)')
  p.add_argument('--layers', type=int, help='(default per --model)')
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--shapes', help='BxT,... (default per --model)')
  p.add_argument('--json')
  p.add_argument(
    '--variants', help='regex: time only the rows it matches (FP32 always)'
  )
  args = p.parse_args()
  module, make_variants, d, ff, layers, shapes = MODELS[args.model]
  d, ff, layers = args.d or d, args.ff or ff, args.layers or layers
  shapes = [
    tuple(map(int, s.split('x'))) for s in (args.shapes or shapes).split(',')
  ]
  model = module(d=d, ff=ff, layers=layers)
  x0 = jnp.ones((1, 1, d))
  fp = jax.jit(model.init)(jax.random.key(0), x0)['params']
  ptq_rules = [qwix.QuantizationRule(weight_qtype=jnp.int4, tile_size=128)]
  rules = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=128, rank=args.rank)]
  variants = make_variants(model, fp, x0, ptq_rules, rules)
  ptq = variants['Qwix PTQ int4'][1]
  if args.variants:
    variants = {
      k: v
      for k, v in variants.items()
      if k == 'FP32' or re.search(args.variants, k)
    }
  bandwidth = read_bandwidth()
  timed = measure(variants, shapes, d, args.repeats)
  results = table_rows(timed, variants, stored_bytes(fp), ptq, bandwidth)
  print_table(results, bandwidth)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
