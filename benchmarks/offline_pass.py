"""Offline-pass time on one Llama-7B-shaped decoder block (float32).

q, k, v, o: 4096 x 4096; gate, up: 4096 x 11008; down: 11008 x 4096;
int4 per-group 128, rank 32. Times, in one process:

  * plain `qwix.quantize_params` (the floor),
  * the earlier project's algorithm: an eager per-layer loop of full
    NumPy SVDs of E = W - deq(Wq), A = U_k S_k, B = V_k^T,
  * lqer 'svd' with the exact solver, the default randomized solver (block
    Krylov) and plain subspace iteration with 16 power iterations,
  * lqer 'qera' with the exact and the randomized solver (statistics of
    synthetic correlated activations; calibration itself is not timed),

and prints seconds per block, per billion parameters, and extrapolated to a
whole 7B model (32 blocks; fast variants are timed twice, the second,
compiled run counting for blocks 2-32), the captured-energy ratio of the
randomized solver against the exact one, (||E||^2 - ||E - AB||^2) / same for
exact, for plain (E) and weighted (L^T E) matrices by power iterations
(block Krylov and subspace iteration), and
the peak memory of the default 'svd' and 'qera' passes.

    python benchmarks/offline_pass.py [--json FILE] [--dims 4096 11008]
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

import lqer
from lqer import decompose

BLOCK_SIZE_7B = 32


class Block(nn.Module):
  """The seven projections of a Llama block, as Dense layers."""

  d: int
  ff: int

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
    h = dense(self.d, 'q')(x) + dense(self.d, 'k')(x) + dense(self.d, 'v')(x)
    h = dense(self.d, 'o')(h)
    g = dense(self.ff, 'gate')(h) * dense(self.ff, 'up')(h)
    return dense(self.d, 'down')(g)


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def earlier_project(fp, abstract, rank):
  """Seed 002's algorithm: eager loop, full SVD of E per layer."""
  out = {}
  for name, leaf in fp.items():
    w = leaf['kernel']
    q = qwix.quantize_params({name: leaf}, abstract)[name]['kernel']
    e = np.asarray(w) - np.asarray(qwix.dequantize(q.array))
    u, s, vt = np.linalg.svd(e, full_matrices=False)
    out[name] = (u[:, :rank] * s[:rank], vt[:rank])
  return out


def captured_energy(e, rank, **solver_kw):
  a, b = decompose.svd_factors(e, rank, **solver_kw)
  resid = e - a @ b
  return float(jnp.sum(e**2) - jnp.sum(resid**2))


def setup(args):
  """The float block and QERA statistics of correlated tokens."""
  d, ff = args.dims
  x = jnp.ones((1, d))
  model = Block(d, ff)
  fp = jax.jit(model.init)(jax.random.key(0), x)['params']
  # Calibration statistics of correlated activations (not timed).
  rules0 = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=128, rank=1,
                          method='qera')]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules0))
  stats = cal.init(jax.random.key(0), x)['quant_stats']
  mix = jax.random.normal(jax.random.key(1), (d, d)) / np.sqrt(d)
  for i in range(max(1, args.tokens // 1024)):
    xb = jax.random.normal(jax.random.key(10 + i), (1024, d)) @ (
        jnp.eye(d) + 2 * mix)
    _, new = jax.jit(lambda s, xb: cal.apply({'params': fp, 'quant_stats': s},
                                             xb, mutable='quant_stats'))(
                                                 stats, xb)
    stats = new['quant_stats']
  jax.block_until_ready(stats)
  return model, x, fp, stats


def _rss() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def peak_only(args, model, x, fp, stats):
  """Child process: peak RSS growth of one lqer pass above params + stats."""
  method = args.peak_only
  rules = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=128,
                         rank=args.rank, method=method)]
  qm = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
  baseline = _rss()
  peak = [baseline]
  done = threading.Event()

  def poll():  # RSS sampled every 5 ms during the pass
    while not done.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.005)

  thread = threading.Thread(target=poll)
  thread.start()
  jax.block_until_ready(lqer.lqer_quantize_params(fp, abstract,
                                                  calibration=stats))
  done.set()
  thread.join()
  print(json.dumps({'method': method, 'baseline': baseline,
                    'peak_growth': max(peak[0], _rss()) - baseline}))


def measure_peaks(args, n_params):
  """Peak RSS growth of the default randomized pass, one child per method."""
  d, ff = args.dims
  params_bytes = n_params * 4
  group_bytes = 2 * d * ff * 4  # gate + up: the largest same-shape group
  out = {}
  for method in ['svd', 'qera']:
    child = subprocess.run(
        [sys.executable, __file__, '--peak-only', method, '--dims', str(d),
         str(ff), '--rank', str(args.rank), '--tokens', str(args.tokens)],
        capture_output=True, text=True, check=True)
    r = json.loads(child.stdout.strip().splitlines()[-1])
    out[method] = r
    print(f'peak memory of the {method} pass above params + stats:'
          f' {r["peak_growth"] / 2**30:.2f} GiB ='
          f' {r["peak_growth"] / params_bytes:.2f}x the float32 block,'
          f' {r["peak_growth"] / group_bytes:.2f}x the largest group'
          f' (gate + up, {group_bytes / 2**30:.2f} GiB)', flush=True)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--dims', type=int, nargs=2, default=[4096, 11008])
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--tokens', type=int, default=8192)
  p.add_argument('--json')
  p.add_argument('--peak-only', choices=['svd', 'qera'],
                 help=argparse.SUPPRESS)
  args = p.parse_args()
  model, x, fp, stats = setup(args)
  n_params = sum(v.size for v in jax.tree.leaves(fp))
  if args.peak_only:
    return peak_only(args, model, x, fp, stats)

  rows = []

  def record(name, fn, twice):
    """Times fn; with `twice`, a second, compiled call is the per-block time
    (the first includes compilation, paid once per shape: a 7B model is one
    first block plus 31 more). The minutes-long exact variants run once."""
    _, first = _timed(fn)
    secs = _timed(fn)[1] if twice else first
    rows.append({'variant': name, 'seconds_per_block': secs,
                 'first_block_seconds': first,
                 'seconds_per_billion_params': secs / n_params * 1e9,
                 'minutes_7b_32_blocks':
                     (first + secs * (BLOCK_SIZE_7B - 1)) / 60})
    print(f'{name:32s} {secs:8.1f} s/block (first {first:.1f} s)',
          flush=True)

  ptq_rules = [qwix.QuantizationRule(weight_qtype=jnp.int4, tile_size=128)]
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(ptq_rules))
  ptq_abs = jax.eval_shape(ptq_model.init, jax.random.key(0), x)['params']
  record('qwix.quantize_params (PTQ)',
         lambda: qwix.quantize_params(fp, ptq_abs), True)
  record('earlier project (eager full SVD)',
         lambda: earlier_project(fp, ptq_abs, args.rank), False)
  variants = [('svd', 'exact', None, True), ('svd', 'randomized', None, True),
              ('svd', 'randomized', 16, False), ('qera', 'exact', None, True),
              ('qera', 'randomized', None, True)]
  for method, solver, iters, krylov in variants:
    rules = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=128,
                           rank=args.rank, method=method, solver=solver,
                           power_iters=iters, krylov=krylov)]
    qm = qwix.quantize_model(model, lqer.LqerProvider(rules))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
    label = f'lqer {method} {solver}' + (
        f' ({"block Krylov" if krylov else "subspace"},'
        f' {rules[0].resolved_power_iters} power iterations)'
        if solver == 'randomized' else '')
    record(label, lambda: lqer.lqer_quantize_params(fp, abstract,
                                                    calibration=stats),
           solver == 'randomized')

  # Captured energy of the randomized solver vs exact, on 'o' (plain E, the
  # 'svd' matrix) and on its whitened (QERA) matrix, for several power
  # iteration counts; '*' marks each method's default.
  w = fp['o']['kernel']
  q = qwix.quantize(w, jnp.int4, channelwise_axes=[1], tiled_axes={0: 128})
  e = w - qwix.dequantize(q)
  r = stats['o']['kernel_lqer']
  chol = decompose.damped_cholesky(r['sum_of_xtx'] / r['count'], 0.01)
  energy = {}
  for label, m, method in [('plain E', e, 'svd'),
                           ('weighted L^T E', chol.T @ e, 'qera')]:
    rule = lqer.LqerRule(weight_qtype=jnp.int4, rank=args.rank,
                         method=method)
    exact = captured_energy(m, args.rank)
    for krylov, counts in [(True, (2, 3, 4, 6, 8)), (False, (4, 8, 16))]:
      for iters in sorted({*counts, rule.resolved_power_iters}):
        rand = captured_energy(m, args.rank, solver='randomized',
                               key=jax.random.key(0),
                               oversample=rule.oversample,
                               power_iters=iters, krylov=krylov)
        kind = 'block Krylov' if krylov else 'subspace'
        name = f'{label}, {kind}, {iters} power iterations'
        energy[name] = rand / exact
        mark = ' *' if krylov and iters == rule.resolved_power_iters else ''
        print(f'captured energy, randomized / exact, {label}, {kind},'
              f' oversample {rule.oversample}, {iters} power iterations:'
              f' {rand / exact:.4f}{mark}')

  print()
  print('| variant | s / block | first block s | s / 1e9 params |'
        ' 7B (32 blocks), min |')
  print('|---|---|---|---|---|')
  base = {r['variant']: r['seconds_per_block'] for r in rows}
  for r in rows:
    print(f"| {r['variant']} | {r['seconds_per_block']:.1f} |"
          f" {r['first_block_seconds']:.1f} |"
          f" {r['seconds_per_billion_params']:.1f} |"
          f" {r['minutes_7b_32_blocks']:.1f} |")
  earlier = base['earlier project (eager full SVD)']
  ptq = base['qwix.quantize_params (PTQ)']
  for name in base:
    if name.startswith('lqer svd randomized'):
      print(f'\n{name} vs earlier project: {earlier / base[name]:.1f}x'
            f' faster; vs plain PTQ: {base[name] / ptq:.1f}x slower', end='')
  print()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  params_bytes = n_params * 4
  print(f'peak RSS of the whole run: {peak / 2**30:.2f} GiB = '
        f'{peak / params_bytes:.2f}x the float32 block'
        f' ({params_bytes / 2**30:.2f} GiB; the statistics and the exact'
        ' solvers are included)')
  peaks = measure_peaks(args, n_params)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': rows, 'captured_energy_ratio': energy,
                 'pass_peak_growth': peaks,
                 'peak_rss_bytes': peak, 'params_bytes': params_bytes},
                f, indent=1)


if __name__ == '__main__':
  main()
