"""How rank allocation compares layers: each `allocation.NORMALIZE` choice
against the uniform rank that spends the same bits, on a bundled model.

    python benchmarks/allocation.py --model minilm --budget 1.0 --factor-bits 4

Prints per choice the allocated ranks (min / median / max, how many 0),
the extra bits per weight spent (the report's count) and the quality.
Calibration runs once; every row uses the same statistics.
"""

import argparse
import time

import jax
import numpy as np

from lqer.cli import tasks
from lqer.cli.main import FACTOR_QTYPES
from lqer.offline import allocation
from lqer.offline import probe as probe_lib
from lqer.offline.report import report
from lqer.quant import recipes
from lqer.quant.weight import WithLqer


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  p.add_argument('--model', choices=sorted(tasks.TASKS), default='minilm')
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--tile-size', type=int, default=128)
  p.add_argument('--budget', type=float, default=1.0)
  p.add_argument('--factor-bits', type=int, choices=[16, 8, 4], default=8)
  p.add_argument('--method', default='qera')
  p.add_argument(
    '--normalize',
    nargs='+',
    default=[*allocation.NORMALIZE[1:], 'sensitivity', 'fisher', 'probe'],
    help="'gradient' (the default valuation): the"
    " output-gradient statistics of the task's gradient batches"
    " (gathered once, their seconds printed); 'sensitivity':"
    ' output_sensitivity of the PTQ error with Gaussian'
    " directions; 'fisher': with output='softmax'"
    " (logits); 'probe': Budget(probe=OutputProbe(...)), the"
    " damage measured on the factors (lqer eval's; the task's"
    ' probe output)',
  )
  p.add_argument(
    '--probe-seeds',
    type=int,
    nargs='+',
    default=[0],
    help="seeds of the 'sensitivity' / 'fisher' / 'probe'"
    ' probes: one row each (the spread is the probe noise)',
  )
  p.add_argument(
    '--sensitivity-power',
    type=float,
    default=1.0,
    help='probed sensitivities are raised to this power (< 1:'
    ' their noise, and their spread, shrink)',
  )
  args = p.parse_args()
  task = tasks.TASKS[args.model]()
  rules_for = lambda rank: recipes.build_rules(
    task.params,
    task.module_path,
    args.bits,
    args.tile_size,
    rank,
    args.method,
    factor_qtype=FACTOR_QTYPES[args.factor_bits],
  )[0]
  stats = tasks.calibration_statistics(task, rules_for(1))
  if 'gradient' in args.normalize:
    stats = tasks.gradient_statistics(task, rules_for(1), stats)
  _, ptq, _ = tasks.quantize(task, rules_for(None), stats)
  ptq_total = report(task.params, ptq).total()
  rows = []

  def add(label, model, params):
    total = report(task.params, params).total()
    extra = total['bits_per_weight'] - ptq_total['bits_per_weight']
    ranks = np.array([w.rank for w in _weights(params)])
    value = task.score(model, params)[task.metric]
    rows.append((label, ranks, extra, value))
    print(f'  {label}: {task.metric} {value:.4f}', flush=True)
    return extra

  spent = []
  probe = task.gradient_batches or task.calib_batches[:1]
  for how in args.normalize:
    probed = how in ('sensitivity', 'fisher', 'probe')
    for seed in args.probe_seeds if probed else [None]:
      if how == 'probe':
        budget = allocation.Budget(
          args.budget,
          probe=probe_lib.OutputProbe(
            lambda p, *b: task.module.apply({'params': p}, *b),
            probe,
            seed=seed,
            output=task.output,
          ),
        )
        label = f'auto (probe, seed {seed})'
      elif probed:
        start = time.perf_counter()
        sens = probe_lib.output_sensitivity(
          lambda p, *b: task.module.apply({'params': p}, *b),
          task.params,
          ptq,
          probe,
          seed=seed,
          output='softmax' if how == 'fisher' else 'gaussian',
        )
        budget = allocation.Budget(
          args.budget,
          sensitivity={k: v**args.sensitivity_power for k, v in sens.items()},
        )
        label = f'auto ({how}, seed {seed})'
        print(
          f'  {label} probe: {time.perf_counter() - start:.1f} s', flush=True
        )
      else:
        budget = allocation.Budget(args.budget, normalize=how)
        label = f'auto ({how})'
      model, params, secs = tasks.quantize(
        task, rules_for('auto'), stats, budget_bits=budget
      )
      print(f'  {label}: offline {secs:.1f} s', flush=True)
      spent.append(add(label, model, params))
  uniform = tasks.uniform_rank_for(params, ptq_total['num_weights'], max(spent))
  model, params, _ = tasks.quantize(task, rules_for(uniform), stats)
  add(f'uniform r{uniform}', model, params)
  print(
    f'\n{args.model} W{args.bits} g{args.tile_size} {args.method},'
    f' factors {args.factor_bits}-bit, budget {args.budget} extra'
    ' bits/weight\n'
  )
  print(
    f'| allocation | ranks min / median / max | rank 0 | extra bits |'
    f' {task.metric} |\n|---|---|---|---|---|'
  )
  for label, ranks, extra, value in rows:
    print(
      f'| {label} | {ranks.min()} / {int(np.median(ranks))} /'
      f' {ranks.max()} | {int((ranks == 0).sum())} | {extra:.3f} |'
      f' {value:.4f} |'
    )


def _weights(params):
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, WithLqer))
  return [x for x in leaves if isinstance(x, WithLqer)]


if __name__ == '__main__':
  main()
