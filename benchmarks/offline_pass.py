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
the peak memory of the default 'svd' and 'qera' passes, and GPTQ per shape
group of the block (int4, group 128 where 128 divides the inputs, else per
channel; H = E[x^T x] of the same statistics):
Qwix's eager `gptq_core.quantize_weight` one weight at a time against
lqer's jitted GPTQ (`lqer.core.gptq`) one weight at a time and stacked (one
vmapped call per group), interleaved in one process, medians of --gptq-reps
runs after a warm-up (first calls, compilation included, shown apart).

    python benchmarks/offline_pass.py [--json FILE] [--dims 4096 11008]
    python benchmarks/offline_pass.py --gptq-only --dims 128 384  # quick
    python benchmarks/offline_pass.py --gptq-only --gptq-weights 1 --gptq-reps 0

Qwix's eager GPTQ costs (1 + --gptq-reps) passes over the block (0: the
warm-up call alone is timed). On a CPU shared with other jobs, pin the run
(taskset -c 0): unpinned, XLA's thread pool stalled the while-loop steps of
the jitted GPTQ (0.5 s per call instead of 6 ms at 128 x 384).
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
from qwix._src.core import qarray
from qwix.contrib import gptq_core

import lqer
from lqer.core import decompose
from lqer.core import gptq as lqer_gptq

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
  rules0 = [
    lqer.LqerRule(weight_qtype=jnp.int4, tile_size=128, rank=1, method='qera')
  ]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules0))
  stats = cal.init(jax.random.key(0), x)['quant_stats']
  mix = jax.random.normal(jax.random.key(1), (d, d)) / np.sqrt(d)
  for i in range(max(1, args.tokens // 1024)):
    xb = jax.random.normal(jax.random.key(10 + i), (1024, d)) @ (
      jnp.eye(d) + 2 * mix
    )
    _, new = jax.jit(
      lambda s, xb: cal.apply(
        {'params': fp, 'quant_stats': s}, xb, mutable='quant_stats'
      )
    )(stats, xb)
    stats = new['quant_stats']
  jax.block_until_ready(stats)
  return model, x, fp, stats


def _rss() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def peak_only(args, model, x, fp, stats):
  """Child process: peak RSS growth of one lqer pass above params + stats."""
  method = args.peak_only
  rules = [
    lqer.LqerRule(
      weight_qtype=jnp.int4, tile_size=128, rank=args.rank, method=method
    )
  ]
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
  jax.block_until_ready(
    lqer.lqer_quantize_params(fp, abstract, calibration=stats)
  )
  done.set()
  thread.join()
  print(
    json.dumps(
      {
        'method': method,
        'baseline': baseline,
        'peak_growth': max(peak[0], _rss()) - baseline,
      }
    )
  )


def measure_peaks(args, n_params):
  """Peak RSS growth of the default randomized pass, one child per method."""
  d, ff = args.dims
  params_bytes = n_params * 4
  group_bytes = 2 * d * ff * 4  # gate + up: the largest same-shape group
  out = {}
  for method in ['svd', 'qera']:
    child = subprocess.run(
      [
        sys.executable,
        __file__,
        '--peak-only',
        method,
        '--dims',
        str(d),
        str(ff),
        '--rank',
        str(args.rank),
        '--tokens',
        str(args.tokens),
      ],
      capture_output=True,
      text=True,
      check=True,
    )
    r = json.loads(child.stdout.strip().splitlines()[-1])
    out[method] = r
    print(
      f'peak memory of the {method} pass above params + stats:'
      f' {r["peak_growth"] / 2**30:.2f} GiB ='
      f' {r["peak_growth"] / params_bytes:.2f}x the float32 block,'
      f' {r["peak_growth"] / group_bytes:.2f}x the largest group'
      f' (gate + up, {group_bytes / 2**30:.2f} GiB)',
      flush=True,
    )
  return out


def gptq_comparison(args, fp, stats):
  """Qwix's eager GPTQ vs lqer's jitted one per shape group of the block:
  seconds per group (median of --gptq-reps interleaved runs after a warm-up
  call each) and the fraction of integers on which they differ."""
  groups = {}
  for name, leaf in fp.items():  # Flax kernels (in, out) -> (out, in)
    r = stats[name]['kernel_lqer']
    groups.setdefault(leaf['kernel'].shape, []).append(
      (name, leaf['kernel'].T, r['sum_of_xtx'] / r['count'])
    )
  rows = []
  for members in groups.values():
    names, ws, hs = zip(*members[: args.gptq_weights])
    # Groups of 128 inputs where they divide the weight (lqer eval's rule),
    # else per channel.
    how = qarray.HowToQuantize(
      qtype=jnp.int4,
      channelwise_axes=[0],
      tiled_axes={1: 128} if ws[0].shape[1] % 128 == 0 else {},
    )
    stacked = (jnp.stack(ws), jnp.stack(hs))
    runs = {
      'qwix': lambda: [
        gptq_core.quantize_weight(w, h, how)[0] for w, h in zip(ws, hs)
      ],
      'lqer': lambda: [
        lqer_gptq.quantize_weight(w, h, how) for w, h in zip(ws, hs)
      ],
      'stacked': lambda: lqer_gptq.quantize_stacked(*stacked, how),
    }
    first, times, out = {}, {k: [] for k in runs}, {}
    for k, fn in runs.items():
      out[k], first[k] = _timed(fn)
    for _ in range(args.gptq_reps):
      for k, fn in runs.items():
        times[k].append(_timed(fn)[1])
    med = {k: float(np.median(v)) if v else first[k] for k, v in times.items()}
    qwix_q = np.stack([np.asarray(q.qvalue, np.int8) for q in out['qwix']])
    differ = float(
      np.mean(np.asarray(out['stacked'].qvalue, np.int8) != qwix_q)
    )
    row = {
      'group': '+'.join(names),
      'shape': tuple(ws[0].shape),
      'n': len(ws),
      'median_s': med,
      'first_s': first,
      'qwix_over_lqer': med['qwix'] / med['lqer'],
      'qwix_over_stacked': med['qwix'] / med['stacked'],
      'fraction_of_integers_differing': differ,
    }
    rows.append(row)
    print(
      f'GPTQ {row["group"]} ({len(ws)} x {ws[0].shape[0]} x'
      f' {ws[0].shape[1]}): Qwix {med["qwix"]:.3f} s, lqer'
      f' {med["lqer"]:.3f} s, stacked {med["stacked"]:.3f} s;'
      f' Qwix / lqer {row["qwix_over_lqer"]:.1f}x, / stacked'
      f' {row["qwix_over_stacked"]:.1f}x; integers differing'
      f' {differ:.2e}',
      flush=True,
    )
  print()
  print(
    '| GPTQ group (n x out x in) | Qwix eager s | lqer s | lqer stacked s'
    ' | Qwix / lqer | Qwix / stacked | first call s (Qwix / lqer /'
    ' stacked) | integers differing |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    m, f = r['median_s'], r['first_s']
    print(
      f'| {r["group"]} ({r["n"]} x {r["shape"][0]} x {r["shape"][1]}) |'
      f' {m["qwix"]:.3f} | {m["lqer"]:.3f} | {m["stacked"]:.3f} |'
      f' {r["qwix_over_lqer"]:.1f}x | {r["qwix_over_stacked"]:.1f}x |'
      f' {f["qwix"]:.1f} / {f["lqer"]:.1f} / {f["stacked"]:.1f} |'
      f' {r["fraction_of_integers_differing"]:.1e} |'
    )
  print(
    f'({args.gptq_reps} interleaved runs after a warm-up, medians;'
    f' {jax.devices()[0].device_kind})'
  )
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--dims', type=int, nargs=2, default=[4096, 11008])
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--tokens', type=int, default=8192)
  p.add_argument('--json')
  p.add_argument(
    '--gptq-only',
    action='store_true',
    help='only the GPTQ comparison (quick: --dims 128 384)',
  )
  p.add_argument(
    '--gptq-reps',
    type=int,
    default=3,
    help='timed GPTQ runs per variant after the warm-up (0: the'
    ' warm-up call alone)',
  )
  p.add_argument(
    '--gptq-weights',
    type=int,
    default=None,
    help='GPTQ: time only the first N weights of each shape'
    " group (Qwix's eager GPTQ of a 7B block takes hours here;"
    ' --gptq-weights 1 --gptq-reps 0 times one weight a shape)',
  )
  p.add_argument('--peak-only', choices=['svd', 'qera'], help=argparse.SUPPRESS)
  args = p.parse_args()
  model, x, fp, stats = setup(args)
  n_params = sum(v.size for v in jax.tree.leaves(fp))
  if args.peak_only:
    return peak_only(args, model, x, fp, stats)
  if args.gptq_only:
    gptq_rows = gptq_comparison(args, fp, stats)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'gptq': gptq_rows}, f, indent=1)
    return

  rows = []

  def record(name, fn, twice):
    """Times fn; with `twice`, a second, compiled call is the per-block time
    (the first includes compilation, paid once per shape: a 7B model is one
    first block plus 31 more). The minutes-long exact variants run once."""
    _, first = _timed(fn)
    secs = _timed(fn)[1] if twice else first
    rows.append(
      {
        'variant': name,
        'seconds_per_block': secs,
        'first_block_seconds': first,
        'seconds_per_billion_params': secs / n_params * 1e9,
        'minutes_7b_32_blocks': (first + secs * (BLOCK_SIZE_7B - 1)) / 60,
      }
    )
    print(f'{name:32s} {secs:8.1f} s/block (first {first:.1f} s)', flush=True)

  ptq_rules = [qwix.QuantizationRule(weight_qtype=jnp.int4, tile_size=128)]
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(ptq_rules))
  ptq_abs = jax.eval_shape(ptq_model.init, jax.random.key(0), x)['params']
  record(
    'qwix.quantize_params (PTQ)',
    lambda: qwix.quantize_params(fp, ptq_abs),
    True,
  )
  record(
    'earlier project (eager full SVD)',
    lambda: earlier_project(fp, ptq_abs, args.rank),
    False,
  )
  variants = [
    ('svd', 'exact', None, True),
    ('svd', 'randomized', None, True),
    ('svd', 'randomized', 16, False),
    ('qera', 'exact', None, True),
    ('qera', 'randomized', None, True),
  ]
  for method, solver, iters, krylov in variants:
    rules = [
      lqer.LqerRule(
        weight_qtype=jnp.int4,
        tile_size=128,
        rank=args.rank,
        method=method,
        solver=solver,
        power_iters=iters,
        krylov=krylov,
      )
    ]
    qm = qwix.quantize_model(model, lqer.LqerProvider(rules))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
    label = f'lqer {method} {solver}' + (
      f' ({"block Krylov" if krylov else "subspace"},'
      f' {rules[0].resolved_power_iters} power iterations)'
      if solver == 'randomized'
      else ''
    )
    record(
      label,
      lambda: lqer.lqer_quantize_params(fp, abstract, calibration=stats),
      solver == 'randomized',
    )

  # Captured energy of the randomized solver vs exact, on 'o' (plain E, the
  # 'svd' matrix) and on its whitened (QERA) matrix, for several power
  # iteration counts; '*' marks each method's default.
  w = fp['o']['kernel']
  q = qwix.quantize(w, jnp.int4, channelwise_axes=[1], tiled_axes={0: 128})
  e = w - qwix.dequantize(q)
  r = stats['o']['kernel_lqer']
  chol = decompose.damped_cholesky(r['sum_of_xtx'] / r['count'], 0.01)
  energy = {}
  for label, m, method in [
    ('plain E', e, 'svd'),
    ('weighted L^T E', chol.T @ e, 'qera'),
  ]:
    rule = lqer.LqerRule(weight_qtype=jnp.int4, rank=args.rank, method=method)
    exact = captured_energy(m, args.rank)
    for krylov, counts in [(True, (2, 3, 4, 6, 8)), (False, (4, 8, 16))]:
      for iters in sorted({*counts, rule.resolved_power_iters}):
        rand = captured_energy(
          m,
          args.rank,
          solver='randomized',
          key=jax.random.key(0),
          oversample=rule.oversample,
          power_iters=iters,
          krylov=krylov,
        )
        kind = 'block Krylov' if krylov else 'subspace'
        name = f'{label}, {kind}, {iters} power iterations'
        energy[name] = rand / exact
        mark = ' *' if krylov and iters == rule.resolved_power_iters else ''
        print(
          f'captured energy, randomized / exact, {label}, {kind},'
          f' oversample {rule.oversample}, {iters} power iterations:'
          f' {rand / exact:.4f}{mark}'
        )

  print()
  print(
    '| variant | s / block | first block s | s / 1e9 params |'
    ' 7B (32 blocks), min |'
  )
  print('|---|---|---|---|---|')
  base = {r['variant']: r['seconds_per_block'] for r in rows}
  for r in rows:
    print(
      f'| {r["variant"]} | {r["seconds_per_block"]:.1f} |'
      f' {r["first_block_seconds"]:.1f} |'
      f' {r["seconds_per_billion_params"]:.1f} |'
      f' {r["minutes_7b_32_blocks"]:.1f} |'
    )
  earlier = base['earlier project (eager full SVD)']
  ptq = base['qwix.quantize_params (PTQ)']
  for name in base:
    if name.startswith('lqer svd randomized'):
      print(
        f'\n{name} vs earlier project: {earlier / base[name]:.1f}x'
        f' faster; vs plain PTQ: {base[name] / ptq:.1f}x slower',
        end='',
      )
  print()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  params_bytes = n_params * 4
  print(
    f'peak RSS of the whole run: {peak / 2**30:.2f} GiB = '
    f'{peak / params_bytes:.2f}x the float32 block'
    f' ({params_bytes / 2**30:.2f} GiB; the statistics and the exact'
    ' solvers are included)'
  )
  peaks = measure_peaks(args, n_params)
  print()
  gptq_rows = gptq_comparison(args, fp, stats)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'rows': rows,
          'captured_energy_ratio': energy,
          'pass_peak_growth': peaks,
          'gptq': gptq_rows,
          'peak_rss_bytes': peak,
          'params_bytes': params_bytes,
        },
        f,
        indent=1,
      )


if __name__ == '__main__':
  main()
