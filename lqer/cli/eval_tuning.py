"""`lqer eval --tune-steps`: the factors of a row tuned to the float
model's output after the closed form (`lqer.tune_factors`), on calibration
batches only; a '<row> tuned' row follows the row it tunes.
"""

import dataclasses
import math
import sys

import jax

from lqer.cli import common
from lqer.cli import tasks
from lqer.offline.tune import tune_factors
from lqer.quant.weight import WithLqer


@dataclasses.dataclass(frozen=True)
class Tuning:
  """lqer eval --tune-steps / --tune-tokens / --tune-lr."""

  steps: int
  tokens: int
  lr: float = common.DEFAULT_TUNE_LR
  seed: int = 0


def has_factors(params) -> bool:
  return any(
    isinstance(w, WithLqer) and w.rank > 0
    for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, WithLqer))
  )


def tune(task: tasks.Task, model, params, stats, tuning: Tuning):
  """`lqer.tune_factors` of the LQER params on the task's tuning batches
  (calibration tokens only: `Task.tune_batches`, else the calibration
  batches); prints what it did."""
  params, record = tune_factors(
    lambda p, *batch: model.apply({'params': p}, *batch),
    task.params,
    params,
    (
      task.tune_batches(tuning.tokens)
      if task.tune_batches is not None
      else task.calib_batches
    ),
    output='softmax' if task.output == 'softmax' else 'mse',
    fp_apply_fn=lambda p, *batch: task.module.apply({'params': p}, *batch),
    steps=tuning.steps,
    lr=tuning.lr,
    seed=tuning.seed,
    calibration=stats,
    progress=True,
  )
  before, after = record.output_error['TOTAL']
  print(
    f'tuned {tuning.steps} steps on {tuning.tokens} calibration'
    f' {"tokens" if task.name == "smollm2" else "sentences"}'
    f' in {record.seconds:.1f} s: {record.output}'
    f' {record.objective_before:.4g} -> {record.objective_after:.4g};'
    f' report output error {before:.4f} -> {after:.4f}'
    + ('' if record.kept else '; it rose: the closed form is kept'),
    file=sys.stderr,
    flush=True,
  )
  return params, record


def record_json(record, tuning: Tuning) -> dict:
  """A tuned row's `Row.tuning` (JSON): objective and the report's output
  errors (TOTAL and per weight) before and after."""
  return {
    'steps': record.steps,
    'tokens': tuning.tokens,
    'lr': record.lr,
    'seed': record.seed,
    'objective': record.output,
    'objective_before': record.objective_before,
    'objective_after': record.objective_after,
    'kept': record.kept,
    'seconds': record.seconds,
    'output_error': {p: list(v) for p, v in record.output_error.items()},
  }


def from_args(args) -> Tuning | None:
  """--tune-steps / --tune-tokens / --tune-lr as a `Tuning` (None: no
  tuning), checked before any model loads."""
  if args.tune_steps < 0:
    raise SystemExit(f'--tune-steps must be >= 0, got {args.tune_steps}')
  if not args.tune_steps:
    if args.tune_tokens is not None or args.tune_lr is not None:
      raise SystemExit('--tune-tokens and --tune-lr need --tune-steps N > 0')
    return None
  if args.load is not None:
    raise SystemExit(
      '--tune-steps tunes factors as they are quantized; not with --load'
    )
  smollm2 = args.model == 'smollm2'
  tokens = args.tune_tokens or (
    common.DEFAULT_TUNE_TOKENS if smollm2 else common.DEFAULT_TUNE_SENTENCES
  )
  calib = min(
    args.calib_tokens
    or [
      common.DEFAULT_CALIB_TOKENS if smollm2 else common.DEFAULT_CALIB_SENTENCES
    ]
  )
  unit = 'tokens' if smollm2 else 'sentences'
  if not 0 < tokens <= calib:
    raise SystemExit(
      f'--tune-tokens must be in [1, {calib}]: tuning reads calibration'
      f' {unit} only, and the calibration has {calib}; got {tokens}'
    )
  lr = common.DEFAULT_TUNE_LR if args.tune_lr is None else args.tune_lr
  if not (math.isfinite(lr) and lr > 0):
    raise SystemExit(f'--tune-lr must be a finite number > 0, got {lr}')
  return Tuning(args.tune_steps, tokens, lr)
