"""The earlier project's README table, on a small Transformer.

`models.transformer.Transformer(d_model=128, num_heads=4, d_ff=512,
num_layers=2, d_out=64)`, float params from `init` on inputs (4, 32, 64) of a
fixed PRNG key. "Error" is the relative output error of the whole model,
||y_q - y_fp||_F / ||y_fp||_F, on a fixed evaluation input of the same shape
drawn from a different key; Improvement = 1 - LQER / PTQ.

Rows, for INT8 rank 16, INT4 rank 16, INT4 rank 32, per-channel and then
per-group (tile_size=128 where the layer allows it):

  * lqer svd      - `LqerRule(method='svd')`, default (randomized) solver and
                    bf16 factors, `LqerProvider(compute_dtype=float32)`
                    (Qwix's numbers; this table compares algorithms);
  * earlier algo  - the earlier project's algorithm, reimplemented here: an
                    eager per-layer loop, full NumPy SVD of E = W - deq(Wq),
                    A = U_k S_k, B = V_k^T; evaluated as the float model with
                    W_hat = deq(Wq) + A B (float32), independent of lqer;
  * lqer svd exact - `method='svd'`, `solver='exact'`, float32 factors: the
                    earlier algorithm's math inside lqer (the two rows agree
                    up to rounding; the footer prints the largest gap);
  * lqer qera     - `method='qera'` (default damping and solver), calibrated
                    with `LqerCalibrationProvider` on separate random inputs
                    (neither the init nor the evaluation input).

PTQ is plain Qwix (`qwix.PtqProvider` + `qwix.quantize_params`) with the same
qtype and tiling. Qwix tiles the innermost contracting axis of a kernel;
layers where that axis is not a multiple of 128 get per-channel scales in
the per-group rows (listed in the footnote) through a first rule that matches
them by module path without a tile size.

    python benchmarks/seed_table.py [--quick] [--json FILE]
"""

import os

# Small NumPy SVDs run ~100x slower when OpenBLAS's threads fight XLA's for
# two cores; one BLAS thread (set before NumPy loads) avoids that.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import json
import re
import shlex
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix

import lqer
from models.transformer import Transformer

MODEL = dict(d_model=128, num_heads=4, d_ff=512, num_layers=2, d_out=64)
SHAPE = (4, 32, 64)  # init and evaluation inputs: (batch, seq, features)
CAL_SHAPE = (64, 32, 64)  # calibration inputs for 'qera': 2048 tokens
GROUP = 128
CONFIGS = [  # (label, qtype, rank)
  ('INT8', jnp.int8, 16),
  ('INT4', jnp.int4, 16),
  ('INT4', jnp.int4, 32),
]
IMPLS = ('lqer svd', 'earlier algo', 'lqer svd exact', 'lqer qera')


def rel_error(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def kernel_paths(fp):
  return [p for p in flax.traverse_util.flatten_dict(fp) if p[-1] == 'kernel']


def tiling_of_modules(model, x, qtype):
  """Module paths by the size of their innermost contracting axis.

  Returns (untiled, single): layers whose axis is not a multiple of 128 (they
  get per-channel scales) and layers whose axis is exactly 128 (one group,
  the same as per-channel). The contracting axes come from the kernels'
  `WithLqer` layouts (an untiled abstract tree); Qwix tiles the last one.
  """
  rules = [lqer.LqerRule(weight_qtype=qtype, rank=1)]
  qm = qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=jnp.float32)
  )
  abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
  flat = flax.traverse_util.flatten_dict(abstract)
  untiled, single = [], []
  for path in kernel_paths(abstract):
    layout = flat[path].layout
    size = layout.shape[layout.contracting_axes[-1]]
    name = '/'.join(path[:-1])
    if size % GROUP:
      untiled.append(name)
    elif size == GROUP:
      single.append(name)
  return untiled, single


def make_rules(cls, qtype, tile, untiled, **kw):
  """Rules by module path: the untiled layers first, then everything."""
  rules = []
  if tile and untiled:
    rules.append(
      cls(
        module_path='|'.join(map(re.escape, untiled)), weight_qtype=qtype, **kw
      )
    )
  rules.append(cls(module_path='.*', weight_qtype=qtype, tile_size=tile, **kw))
  return rules


def ptq_error(model, fp, x, x_eval, y_fp, qtype, tile, untiled):
  rules = make_rules(qwix.QuantizationRule, qtype, tile, untiled)
  qm = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
  params = qwix.quantize_params(fp, abstract)
  return rel_error(jax.jit(qm.apply)({'params': params}, x_eval), y_fp), (
    abstract,
    params,
  )


def lqer_error(model, fp, x, x_eval, y_fp, rules, stats=None):
  qm = qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=jnp.float32)
  )
  abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
  params = lqer.lqer_quantize_params(fp, abstract, calibration=stats)
  return rel_error(jax.jit(qm.apply)({'params': params}, x_eval), y_fp)


@functools.lru_cache(maxsize=None)
def jitted_apply(model):
  return jax.jit(model.apply)


def earlier_algorithm(model, fp, x_eval, y_fp, ptq_params, rank):
  """Eager per-layer full NumPy SVD of E; the model run with deq + A B."""
  flat = flax.traverse_util.flatten_dict(fp)
  new = dict(flat)
  for path in kernel_paths(fp):
    w = np.asarray(flat[path], np.float64)
    q = flax.traverse_util.flatten_dict(
      ptq_params,
      is_leaf=lambda _, v: isinstance(v, qwix._src.providers.ptq.WithAux),
    )[path]
    deq = np.asarray(qwix.dequantize(q.array), np.float64)
    # (in, out): every non-channelwise axis contracts, kept in kernel order.
    channelwise = set(q.how.channelwise_axes)
    contracting = [a for a in range(w.ndim) if a not in channelwise]
    perm = contracting + sorted(channelwise)
    n_in = int(np.prod([w.shape[a] for a in contracting]))
    e = np.transpose(w - deq, perm).reshape(n_in, -1)
    u, s, vt = np.linalg.svd(e, full_matrices=False)
    ab = (u[:, :rank] * s[:rank]) @ vt[:rank]
    ab = np.transpose(ab.reshape([w.shape[a] for a in perm]), np.argsort(perm))
    new[path] = jnp.asarray(deq + ab, jnp.float32)
  params = flax.traverse_util.unflatten_dict(new)
  return rel_error(jitted_apply(model)({'params': params}, x_eval), y_fp)


def calibrate(model, fp, x, x_cal, rules):
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  stats = cal.init(jax.random.key(0), x)['quant_stats']
  step = jax.jit(
    lambda s, b: cal.apply(
      {'params': fp, 'quant_stats': s}, b, mutable='quant_stats'
    )[1]['quant_stats']
  )
  for i in range(0, len(x_cal), 16):
    stats = step(stats, x_cal[i : i + 16])
  return stats


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', help='write the rows as a list of records')
  p.add_argument(
    '--quick',
    action='store_true',
    help='per-channel rows only, no per-group rows',
  )
  args = p.parse_args()
  print('$ python ' + ' '.join(shlex.quote(a) for a in sys.argv), flush=True)
  start = time.time()

  model = Transformer(**MODEL)
  x = jax.random.normal(jax.random.key(0), SHAPE)
  x_eval = jax.random.normal(jax.random.key(1), SHAPE)
  x_cal = jax.random.normal(jax.random.key(2), CAL_SHAPE)
  fp = model.init(jax.random.key(0), x)['params']
  y_fp = jitted_apply(model)({'params': fp}, x_eval)
  untiled, single_group = tiling_of_modules(model, x, jnp.int4)
  stats = calibrate(
    model,
    fp,
    x,
    x_cal,
    [lqer.LqerRule(weight_qtype=jnp.int4, rank=1, method='qera')],
  )

  tilings = [None] if args.quick else [None, GROUP]
  rows = []
  for tile in tilings:
    for label, qtype, rank in CONFIGS:
      quant = f'{label} rank {rank}' + (f', group {tile}' if tile else '')
      ptq, (_, ptq_params) = ptq_error(
        model, fp, x, x_eval, y_fp, qtype, tile, untiled
      )
      errs = {
        'lqer svd': lqer_error(
          model,
          fp,
          x,
          x_eval,
          y_fp,
          make_rules(lqer.LqerRule, qtype, tile, untiled, rank=rank),
        ),
        'earlier algo': earlier_algorithm(
          model, fp, x_eval, y_fp, ptq_params, rank
        ),
        'lqer svd exact': lqer_error(
          model,
          fp,
          x,
          x_eval,
          y_fp,
          make_rules(
            lqer.LqerRule,
            qtype,
            tile,
            untiled,
            rank=rank,
            solver='exact',
            factor_dtype=jnp.float32,
          ),
        ),
        'lqer qera': lqer_error(
          model,
          fp,
          x,
          x_eval,
          y_fp,
          make_rules(
            lqer.LqerRule, qtype, tile, untiled, rank=rank, method='qera'
          ),
          stats,
        ),
      }
      for impl in IMPLS:
        rows.append(
          {
            'model': f'Transformer ({impl})',
            'implementation': impl,
            'quantization': quant,
            'qtype': label.lower(),
            'rank': rank,
            'tile_size': tile,
            'per_channel_layers': untiled if tile else [],
            'ptq_error': ptq,
            'lqer_error': errs[impl],
            'improvement_pct': 100 * (1 - errs[impl] / ptq),
          }
        )
      print(
        f'  {quant}: done ({time.time() - start:.0f} s)',
        file=sys.stderr,
        flush=True,
      )

  rows = [r for impl in IMPLS for r in rows if r['implementation'] == impl]
  print()
  print('| Model | Quantization | PTQ Error | LQER Error | Improvement |')
  print('|---|---|---|---|---|')
  for r in rows:
    star = '*' if r['tile_size'] else ''
    print(
      f'| {r["model"]} | {r["quantization"]}{star} |'
      f' {r["ptq_error"]:.4f} | {r["lqer_error"]:.4f} |'
      f' {r["improvement_pct"]:.1f}% |'
    )
  print()
  dims = ', '.join(f'{k}={v}' for k, v in MODEL.items())
  print(
    f'Transformer({dims}); init and evaluation inputs {SHAPE} from'
    ' jax.random.key(0) and key(1); error = ||y_q - y_fp||_F /'
    ' ||y_fp||_F on the evaluation input. lqer svd: default randomized'
    ' solver, bf16 factors. earlier algo: eager full NumPy SVD per layer,'
    ' W_hat = deq + A B in float32. lqer svd exact: exact solver, f32'
    ' factors. lqer qera: calibrated on'
    f' {CAL_SHAPE[0] * CAL_SHAPE[1]} tokens of separate random inputs'
    ' (key 2).'
  )
  exact = {
    r['quantization']: r['lqer_error']
    for r in rows
    if r['implementation'] == 'lqer svd exact'
  }
  gap = max(
    abs(r['lqer_error'] / exact[r['quantization']] - 1)
    for r in rows
    if r['implementation'] == 'earlier algo'
  )
  print(
    f'lqer svd exact vs earlier algo: largest relative gap in LQER Error'
    f' {gap:.2e}.'
  )
  if not args.quick:
    print(
      f'* group {GROUP}: these layers have an innermost contracting axis'
      f' that is not a multiple of {GROUP} and are quantized per-channel:'
      f' {", ".join(untiled)}; these have exactly {GROUP} and so one'
      f' group per column, the same as per-channel:'
      f' {", ".join(single_group)}.'
    )
  print(f'({time.time() - start:.0f} s)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
