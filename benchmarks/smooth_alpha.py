"""SVDQuant's smoothing strength alpha, searched on the calibration data.

For each alpha, quantizes a bundled model with SVDQuant (with
--error-ranks, also with part of the rank spent on QERA of the residual's
error; with --smoothquant, smoothing alone at rank 0) and scores it on the
*calibration* tokens / sentences, so the choice never sees the evaluation data:
perplexity (smollm2) or mean 1 - cos to the float embeddings (minilm).

    python benchmarks/smooth_alpha.py --model smollm2 --act-bits 4

`lqer eval` takes the per-model result as its default
(`common.DEFAULT_SMOOTH_ALPHA`).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from lqer.cli import tasks
from lqer.quant import recipes


def calibration_score(task, module, params) -> float:
  """The task's metric on its own calibration batches."""
  if task.name == 'smollm2':
    from models import smollm2  # pylint: disable=g-import-not-at-top

    tokens = np.concatenate([b[0] for b in task.calib_batches]).reshape(-1)
    return smollm2.perplexity(module, params, tokens, 512)
  forward = jax.jit(lambda p, *b: module.apply({'params': p}, *b))
  fp = jax.jit(lambda *b: task.module.apply({'params': task.params}, *b))
  cos = [
    jnp.sum(forward(params, *b) * fp(*b), axis=-1) for b in task.calib_batches
  ]
  return float(np.mean(1.0 - np.concatenate(cos)))


def parser(description) -> argparse.ArgumentParser:
  """--model, --bits, --act-bits, --tile-size, --rank (W4A4 g128 r32)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--model', choices=sorted(tasks.TASKS), default='smollm2')
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--act-bits', type=int, default=4, choices=[4, 8])
  p.add_argument('--tile-size', type=int, default=128)
  p.add_argument('--rank', type=int, default=32)
  return p


def main():
  p = parser(__doc__)
  p.add_argument(
    '--alphas', type=float, nargs='+', default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
  )
  p.add_argument(
    '--smoothquant',
    action='store_true',
    help='also score smoothing alone (rank 0)',
  )
  p.add_argument(
    '--qera',
    action='store_true',
    help='also score QERA at the same rank (no smoothing)',
  )
  p.add_argument(
    '--error-ranks',
    type=int,
    nargs='+',
    default=[0],
    help='QERA parts of the rank to score (svdquant-qera; 0 = SVDQuant alone)',
  )
  args = p.parse_args()
  task = tasks.TASKS[args.model]()
  build = lambda rank, method, **kw: recipes.build_rules(
    task.params,
    task.module_path,
    args.bits,
    args.tile_size,
    rank,
    method,
    act_bits=args.act_bits,
    **kw,
  )[0]
  stats = tasks.calibration_statistics(task, build(1, 'qera'))
  model, params, _ = tasks.quantize(task, build(None, 'svd'), stats)
  print(
    f'# {args.model} W{args.bits}A{args.act_bits} g{args.tile_size},'
    f' {task.metric} on the calibration data'
  )
  print(f'PTQ: {calibration_score(task, model, params):.4f}', flush=True)
  if args.qera:
    model, params, _ = tasks.quantize(task, build(args.rank, 'qera'), stats)
    print(
      f'QERA rank {args.rank}: {calibration_score(task, model, params):.4f}',
      flush=True,
    )
  columns = [(args.rank - e, e) for e in args.error_ranks] + (
    [(0, 0)] if args.smoothquant else []
  )
  print(
    '| alpha | '
    + ' | '.join(
      f'rank {r}' + (f' + QERA {e}' if e else '') for r, e in columns
    )
    + ' |'
  )
  print('|---|' + '---|' * len(columns))
  for alpha in args.alphas:
    scores = []
    for rank, error_rank in columns:
      rules = build(rank, 'svdquant', smooth_alpha=alpha, error_rank=error_rank)
      model, params, _ = tasks.quantize(task, rules, stats)
      scores.append(calibration_score(task, model, params))
    print(
      f'| {alpha:.2f} | ' + ' | '.join(f'{s:.4f}' for s in scores) + ' |',
      flush=True,
    )


if __name__ == '__main__':
  main()
