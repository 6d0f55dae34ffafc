"""Learning-rate sweep for zero-init QLoRA on SmolLM2 (how the default
`lqer finetune --lr` was chosen): the same base, data, steps and seed as
`lqer finetune`, one row per learning rate.

    python benchmarks/finetune_lr.py --steps 64 --lrs 3e-4 1e-3 3e-3
"""

import argparse

from lqer.cli import common
from lqer.cli import finetune
from lqer.cli import tasks


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--tile-size', type=int, default=128)
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--init', default='zero', choices=list(finetune.INIT_LABELS))
  p.add_argument('--steps', type=int, default=finetune.DEFAULT_STEPS)
  p.add_argument(
    '--batch-tokens',
    type=int,
    default=finetune.DEFAULTS['smollm2']['batch_tokens'],
  )
  p.add_argument('--lrs', type=float, nargs='+', default=[3e-4, 1e-3, 3e-3])
  args = p.parse_args()
  task = tasks.smollm2_task(n_eval=common.DEFAULT_FINETUNE_EVAL_TOKENS)
  print(
    f'| {args.init} init, lr | '
    + ' | '.join(f'step {n}' for n in finetune.step_counts(args.steps))
    + ' |'
  )
  print('|---|' + '---|' * len(finetune.step_counts(args.steps)))
  for lr in args.lrs:
    rows = list(
      finetune.finetune_rows(
        task,
        args.bits,
        args.tile_size,
        args.rank,
        [args.init],
        steps=args.steps,
        batch_tokens=args.batch_tokens,
        lr=lr,
        alpha=float(args.rank),
        train_data=task.train_data,
        with_reference=False,
      )
    )
    print(
      f'| {lr:g} | ' + ' | '.join(f'{r.value:.3f}' for r in rows) + ' |',
      flush=True,
    )


if __name__ == '__main__':
  main()
