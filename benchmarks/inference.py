"""Jitted forward latency and memory: FP32, bf16, Qwix PTQ, LQER.

A Llama-shaped SwiGLU MLP stack (d=2048, ff=5632, 4 layers), int4 per-group
128, rank 32, bf16 factors. For batch x sequence 1x1, 1x128 and 8x128 it
times each variant (median of --repeats runs after warm-up, the variants
interleaved in one process) and reports the compiled forward's temporary
memory (`memory_analysis().temp_size_in_bytes`) against the FP32 weights'
bytes, and the param bytes as stored (int4 packed two per byte, i.e. the
bits of each dtype, not `nbytes`).

    python benchmarks/inference.py [--json FILE] [--layers 4] [--repeats 20]

The MLP table also has W4A8 rows: PTQ with int8 dynamic activations and
SVDQuant (smoothing alpha 0.5, rank 32), each on Qwix's matmul and packed
(x / lam quantized and dequantized, then the packed weight-only matmul).

`--model gemma-block`: one Gemma-3-270M-shaped decoder block (d 640, 4
query heads of dim 256, 1 KV head, gated MLP ff 2048), its kernels laid out
as Google's gemma library writes its einsums (q (N, D, H), kv (2, K, D, H),
out (N, H, D), gate/up (2, F, D)), with causal softmax attention; FP32, Qwix
PTQ int4 and LQER int4 packed (W4 g128 r32) at 1x1 and 1x128:

    python benchmarks/inference.py --model gemma-block [--repeats 20]
"""

import argparse
import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
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


def mlp_variants(model, fp, x0, ptq_rules, rules):
  """FP32, bf16, Qwix PTQ and LQER on each matmul path (the MLP table)."""
  bf16_model = model.clone(dtype=jnp.bfloat16)
  bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), fp)
  ptq_model, ptq = ptq_variant(model, fp, x0, ptq_rules)
  lqer_model = lambda cd: qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=cd)
  )
  params = lqer_params(model, fp, x0, rules)
  ptq_lqer = qwix.quantize_model(model, lqer.LqerProvider(ptq_rules))
  return {
    'FP32': (model, fp),
    'bf16': (bf16_model, bf16),
    'Qwix PTQ int4': (ptq_model, ptq),
    'LQER int4 (Qwix matmul)': (lqer_model(None), params),
    'LQER int4 (f32 at use)': (lqer_model(jnp.float32), params),
    'LQER int4 (auto)': (lqer_model('auto'), params),
    'PTQ int4 packed (auto)': (ptq_lqer, lqer.pack_params(ptq)),
    'LQER int4 packed (auto)': (lqer_model('auto'), lqer.pack_params(params)),
    **w4a8_variants(model, fp, x0, ptq_rules, rules),
  }


def w4a8_variants(model, fp, x0, ptq_rules, rules):
  """PTQ W4A8 and SVDQuant W4A8 (int8 dynamic activations, smoothing
  calibrated on random inputs), each on Qwix's matmul and packed."""
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
  svdquant = lambda cd: qwix.quantize_model(
    model, lqer.LqerProvider(a8_rules, compute_dtype=cd)
  )
  abstract = jax.eval_shape(svdquant(None).init, jax.random.key(0), x0)[
    'params'
  ]
  params = lqer.lqer_quantize_params(
    fp, abstract, calibration=stats['quant_stats']
  )
  ptq_model, ptq = ptq_variant(model, fp, x0, a8_ptq)
  return {
    'Qwix PTQ W4A8': (ptq_model, ptq),
    'PTQ W4A8 packed (auto)': (
      qwix.quantize_model(model, lqer.LqerProvider(a8_ptq)),
      lqer.pack_params(ptq),
    ),
    'SVDQuant W4A8 (Qwix matmul)': (svdquant(None), params),
    'SVDQuant W4A8 packed (auto)': (svdquant('auto'), lqer.pack_params(params)),
  }


def gemma_variants(model, fp, x0, ptq_rules, rules):
  """FP32, Qwix PTQ and LQER packed (the Gemma block table)."""
  lqer_model = qwix.quantize_model(model, lqer.LqerProvider(rules))
  return {
    'FP32': (model, fp),
    'Qwix PTQ int4': ptq_variant(model, fp, x0, ptq_rules),
    'LQER int4 packed (auto)': (
      lqer_model,
      lqer.pack_params(lqer_params(model, fp, x0, rules)),
    ),
  }


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


def table_rows(timed, variants, fp_bytes, ptq):
  """One result dict per shape and variant: ratios vs FP32 and Qwix PTQ."""
  # The branch's cost: each LQER variant against PTQ on the same matmul.
  same_path = {
    'LQER int4 (Qwix matmul)': 'Qwix PTQ int4',
    'LQER int4 packed (auto)': 'PTQ int4 packed (auto)',
    'SVDQuant W4A8 (Qwix matmul)': 'Qwix PTQ W4A8',
    'SVDQuant W4A8 packed (auto)': 'PTQ W4A8 packed (auto)',
  }
  results = []
  for (b, t), by_name in timed.items():
    fp_med, ptq_med = by_name['FP32'][0], by_name['Qwix PTQ int4'][0]
    for name, (med, temp) in by_name.items():
      base = same_path.get(name)
      prm = variants[name][1]
      results.append(
        {
          'shape': f'{b}x{t}',
          'variant': name,
          'median_ms': med * 1e3,
          'vs_fp32': med / fp_med,
          'vs_ptq': med / ptq_med,
          'vs_same_path_ptq': (
            med / by_name[base][0] if base in by_name else None
          ),
          'temp_vs_fp32_weights': temp / fp_bytes,
          'param_bytes_vs_ptq': stored_bytes(prm) / stored_bytes(ptq),
          'param_bytes_vs_fp32': stored_bytes(prm) / fp_bytes,
        }
      )
  return results


def print_table(results):
  print(f'devices: {jax.devices()}')
  print(
    '| shape | variant | median ms | vs FP32 | vs Qwix PTQ |'
    ' branch: vs PTQ on same matmul |'
    ' temp mem / FP32 weights | param bytes / PTQ | param bytes / FP32 |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for r in results:
    same = r['vs_same_path_ptq']
    print(
      f'| {r["shape"]} | {r["variant"]} | {r["median_ms"]:.2f} |'
      f' {r["vs_fp32"]:.2f} | {r["vs_ptq"]:.2f} |'
      f' {"" if same is None else f"{same:.2f}"} |'
      f' {r["temp_vs_fp32_weights"]:.2f} | {r["param_bytes_vs_ptq"]:.3f} |'
      f' {r["param_bytes_vs_fp32"]:.3f} |'
    )


MODELS = {  # --model: (module, variants, default d, ff, layers, shapes)
  'mlp': (SwiGluStack, mlp_variants, 2048, 5632, 4, '1x1,1x128,8x128'),
  'gemma-block': (GemmaBlocks, gemma_variants, 640, 2048, 1, '1x1,1x128'),
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
  timed = measure(variants, shapes, d, args.repeats)
  results = table_rows(
    timed, variants, stored_bytes(fp), variants['Qwix PTQ int4'][1]
  )
  print_table(results)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
