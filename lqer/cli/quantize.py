"""`lqer quantize` and `lqer eval --load` of its output directories.

    lqer quantize CHECKPOINT_DIR --out OUT_DIR --bits 4 --tile-size 128 \\
        --rank 32 --method qera [--base gptq] [--calib-text FILE] \\
        [--calib-tokens N] [--sequential | --no-sequential] [--force] \\
        [--mesh DATA,MODEL] [--distributed [--coordinator HOST:PORT \\
        --num-processes N --process-id I]]

quantizes a Hugging Face checkpoint directory block by block
(`lqer.checkpoints.streaming`); `lqer eval --load OUT_DIR` scores the result
against
the float model it came from, after checking that the source has not
changed since (`check_source`; `--force` warns instead).
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

from lqer.checkpoints import streaming
from lqer.checkpoints import tree as checkpoint
from lqer.cli import common
from lqer.offline.report import report
from lqer.quant.packing import pack_params


def add_parser(sub):
  """The `quantize` subcommand's arguments."""
  q = sub.add_parser(
    'quantize',
    help='quantize a Hugging Face checkpoint'
    ' directory one decoder block at a time',
  )
  q.add_argument(
    'checkpoint',
    help='directory with config.json,'
    ' *.safetensors and tokenizer.json (Llama, SmolLM2, Qwen2)',
  )
  q.add_argument(
    '--out',
    required=True,
    help='output directory (resumed if'
    ' a run with the same arguments was interrupted)',
  )
  common.add_quantizer_arguments(q)
  q.add_argument('--rank', type=int, default=32)
  q.add_argument('--method', default='qera', choices=['svd', 'l2qer', 'qera'])
  q.add_argument('--base', default='rtn', choices=['rtn', 'gptq'])
  q.add_argument(
    '--factor-bits',
    type=int,
    default=16,
    choices=sorted(common.FACTOR_QTYPES, reverse=True),
  )
  q.add_argument(
    '--calib-text',
    help='UTF-8 text file (default: the bundled prose, as lqer eval)',
  )
  q.add_argument(
    '--calib-tokens',
    type=int,
    default=common.DEFAULT_CALIB_TOKENS,
    help=f'calibration tokens, windows of {common.WINDOW}',
  )
  q.add_argument(
    '--sequential',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='feed each block the outputs of the'
    " quantized blocks before it (default; GPTQ's way) or,"
    ' with --no-sequential, of the float ones',
  )
  q.add_argument(
    '--tune-steps',
    type=int,
    default=0,
    help="after each block's closed form, tune its factors (A, B; bases"
    " frozen) this many Adam steps to the float block's output on the"
    " block's inputs (streaming.BlockTuning; default 0: no tuning)",
  )
  q.add_argument(
    '--tune-tokens',
    type=int,
    help='calibration tokens the tuning reads, from the start, one window'
    f' of {common.WINDOW} per step (default: all of --calib-tokens)',
  )
  q.add_argument(
    '--tune-lr',
    type=float,
    default=1e-3,
    help="the tuning's Adam learning rate (default 1e-3)",
  )
  q.add_argument(
    '--json',
    help='write the seconds per block and phase and the peak RSS to this file',
  )
  q.add_argument(
    '--force',
    action='store_true',
    help='write into a non-empty --out that is not an lqer quantize output'
    " (lqer's files go beside the ones there, which are left alone)",
  )
  q.add_argument(
    '--mesh',
    help="DATA,MODEL: split each block over a ('data', 'model') mesh of"
    ' that shape, DATA x MODEL = all devices (default: one device; with'
    ' --distributed, 1,<all devices>)',
  )
  q.add_argument(
    '--distributed',
    action='store_true',
    help='multi-host: call jax.distributed.initialize() first and run the'
    " same command on every host; each reads only its devices' slices of"
    ' the weights, process 0 writes --out (shared storage)',
  )
  q.add_argument(
    '--coordinator',
    help='with --distributed, where JAX does not detect the cluster:'
    ' HOST:PORT of process 0 (with --num-processes and --process-id)',
  )
  q.add_argument('--num-processes', type=int)
  q.add_argument('--process-id', type=int)


def _prose_split(tokenizer, n_calib, n_eval):
  from models import text  # pylint: disable=g-import-not-at-top

  prose = np.asarray(tokenizer.encode(text.prose_text()).ids, np.int32)
  return text.split_tokens(prose, n_calib, n_eval)


def _encode_file(tokenizer, path):
  return np.asarray(
    tokenizer.encode(pathlib.Path(path).read_text()).ids, np.int32
  )


def calibration_windows(
  tokenizer, calib_text=None, n_tokens=common.DEFAULT_CALIB_TOKENS
) -> np.ndarray:
  """(windows, 512) calibration token ids: the first n_tokens of the file,
  or of the bundled prose as `lqer eval` takes them."""
  if calib_text is None:
    try:
      ids = _prose_split(tokenizer, n_tokens, common.DEFAULT_EVAL_TOKENS)[0]
    except ValueError as e:  # more than the prose holds beside lqer eval's
      raise ValueError(
        f'--calib-tokens {n_tokens}: {e}; give --calib-text FILE'
      ) from e
  else:
    ids = _encode_file(tokenizer, calib_text)[:n_tokens]
  if len(ids) < common.WINDOW:
    raise ValueError(
      f'calibration text has {len(ids)} tokens; need at least'
      f' one window of {common.WINDOW}'
    )
  return ids[: len(ids) // common.WINDOW * common.WINDOW].reshape(
    -1, common.WINDOW
  )


def parse_mesh(value) -> tuple[int, int] | None:
  """'DATA,MODEL' -> (DATA, MODEL); None stays None."""
  if value is None:
    return None
  parts = value.split(',')
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise SystemExit(
      f'--mesh {value!r}: give DATA,MODEL, two positive integers (e.g. 1,8)'
    )
  shape = tuple(int(p) for p in parts)
  if min(shape) < 1:
    raise SystemExit(f'--mesh {value!r}: both sizes must be at least 1')
  return shape


def check_distributed(args) -> None:
  """--coordinator, --num-processes and --process-id: all or none, with
  --distributed, and 0 <= process id < processes."""
  manual = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in manual):
    if not args.distributed:
      raise SystemExit(
        '--coordinator, --num-processes and --process-id need --distributed'
      )
    if any(v is None for v in manual):
      raise SystemExit(
        '--distributed: give all of --coordinator HOST:PORT, --num-processes'
        ' and --process-id, or none (JAX detects the cluster)'
      )
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      raise SystemExit(
        f'--process-id {args.process_id} must lie in [0, --num-processes'
        f' {args.num_processes})'
      )


def start_mesh(args, shape):
  """Joins the cluster (--distributed) and builds the ('data', 'model')
  mesh: `shape`, or (1, all devices) under --distributed, or None."""
  if args.distributed:
    # CPU hosts need a collectives backend for the gathers; GPU/TPU ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      args.coordinator, args.num_processes, args.process_id
    )
    shape = shape or (1, jax.device_count())
  if shape is None:
    return None
  if shape[0] * shape[1] != jax.device_count():
    raise SystemExit(
      f'--mesh {shape[0]},{shape[1]}: {shape[0] * shape[1]} devices, but'
      f' there are {jax.device_count()}; DATA x MODEL must equal it'
    )
  return jax.make_mesh(
    shape,
    ('data', 'model'),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def quantize_command(args):
  """Runs `lqer quantize`."""
  from models.hf_checkpoint import CheckpointDir  # pylint: disable=g-import-not-at-top

  if args.rank < 1 or args.calib_tokens < common.WINDOW:
    raise SystemExit(
      f'--rank must be positive and --calib-tokens at least {common.WINDOW}'
    )
  shape = parse_mesh(args.mesh)
  check_distributed(args)
  mesh = start_mesh(args, shape)
  tuning = block_tuning(args)
  ckpt = CheckpointDir(args.checkpoint)
  settings = streaming.Settings(
    bits=args.bits,
    tile_size=args.tile_size or None,
    rank=args.rank,
    method=args.method,
    base=args.base,
    factor_qtype=common.FACTOR_QTYPES[args.factor_bits],
  )
  tokenizer = ckpt.tokenizer()  # refused if it does not fit the embedding
  try:
    windows = calibration_windows(tokenizer, args.calib_text, args.calib_tokens)
  except ValueError as e:
    raise SystemExit(f'lqer quantize: {e}') from e
  common.echo_command('quantize')
  start = time.perf_counter()
  records = streaming.quantize_checkpoint(
    ckpt,
    args.out,
    settings,
    windows,
    sequential=args.sequential,
    mesh=mesh,
    force=args.force,
    tuning=tuning,
  )
  common.write_json(args.json, records)
  who = (
    f'process {jax.process_index()} of {jax.process_count()}: '
    if args.distributed
    else ''
  )
  print(
    f'{who}wrote {args.out}: {ckpt.config.num_layers} blocks in'
    f' {(time.perf_counter() - start) / 60:.1f} min, read {ckpt.reads}'
    f' tensor slices ({ckpt.read_elements} weights), peak RSS'
    f' {streaming.peak_rss_gb():.2f} GB'
  )


def block_tuning(args) -> streaming.BlockTuning | None:
  """--tune-steps / --tune-tokens / --tune-lr as a `BlockTuning` (None:
  no tuning), checked before the checkpoint is read."""
  if args.tune_steps < 0:
    raise SystemExit(f'--tune-steps must be >= 0, got {args.tune_steps}')
  if not args.tune_steps:
    if args.tune_tokens is not None:
      raise SystemExit('--tune-tokens needs --tune-steps N > 0')
    return None
  tokens = args.calib_tokens if args.tune_tokens is None else args.tune_tokens
  if not 0 < tokens <= args.calib_tokens:
    raise SystemExit(
      f'--tune-tokens must be in [1, --calib-tokens {args.calib_tokens}]:'
      f' tuning reads calibration tokens only; got {tokens}'
    )
  if not (np.isfinite(args.tune_lr) and args.tune_lr > 0):
    raise SystemExit(f'--tune-lr must be a number > 0, got {args.tune_lr}')
  return streaming.BlockTuning(args.tune_steps, tokens, args.tune_lr)


def check_load_dir(path) -> None:
  """Raises FileNotFoundError, naming `path`, unless it is None, a directory
  `lqer quantize` wrote (its lqer.json) or one `lqer eval --save` wrote
  (subdirectories holding params.safetensors): `lqer eval --load` checks it
  first, before any model loads."""
  if path is None:
    return
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(
      f'--load {path}: no such directory; give a directory written by'
      ' lqer quantize --out, or by lqer eval --save'
    )
  if not (path / streaming.META).is_file() and not any(
    path.glob(f'*/{checkpoint.FILENAME}')
  ):
    raise FileNotFoundError(
      f'--load {path} holds neither {streaming.META} (written by lqer'
      f' quantize --out) nor */{checkpoint.FILENAME} (written by lqer eval'
      ' --save); give a directory one of them wrote'
    )


def is_quantized_dir(path) -> bool:
  """Whether `path` is a directory `lqer quantize` wrote.

  Raises:
    FileNotFoundError: `path` is given but is not a directory lqer wrote
      (`check_load_dir`), so that `lqer eval --load TYPO` fails at once.
  """
  check_load_dir(path)
  return path is not None and (pathlib.Path(path) / streaming.META).is_file()


def check_source(out, meta, source, force=False) -> list[str]:
  """Compares the source `out`'s lqer.json (`meta`) records with `source`
  (its `CheckpointDir` now).

  Returns:
    The changes, one line each (empty: the same source).

  Raises:
    ValueError: the source changed (naming what), unless `force`, which
      prints a warning to stderr instead.
  """
  from models.hf_checkpoint import describe_changes  # pylint: disable=g-import-not-at-top

  changes = streaming.source_changes(meta, source)
  if changes:
    message = (
      f'the source {source.path} changed since lqer quantize wrote {out}:'
      f' {describe_changes(changes)}'
    )
    if not force:
      raise ValueError(
        f'{message}. Its FP row would score another model than the one'
        ' quantized: rerun lqer quantize (into a new --out), or pass'
        ' --force to evaluate anyway'
      )
    print(
      f'lqer eval: WARNING: {message}. --force: evaluating anyway; the FP'
      ' row scores the changed source, not the model that was quantized',
      file=sys.stderr,
      flush=True,
    )
  return changes


def eval_quantized_dir(args) -> list:
  """FP and quantized perplexity of an `lqer quantize` directory, on the
  bundled prose's held-out tokens (or --eval-text).

  The source the directory's lqer.json names must exist and be unchanged
  (`check_source`; `args.force`, where the parser has it, warns instead),
  and the evaluation tokens must fit its vocabulary: both checked before
  any model loads.
  """
  from models import llama  # pylint: disable=g-import-not-at-top
  from models.hf_checkpoint import CheckpointDir  # pylint: disable=g-import-not-at-top

  check_load_dir(args.load)
  meta = streaming.read_metadata(args.load)
  if not pathlib.Path(meta['source']).is_dir():
    raise FileNotFoundError(
      f'{pathlib.Path(args.load) / streaming.META} names the source'
      f' {meta["source"]}, which is gone: lqer eval --load scores the'
      ' quantized model against it; put the checkpoint back there'
    )
  source = CheckpointDir(meta['source'])
  changed = check_source(
    args.load, meta, source, force=getattr(args, 'force', False)
  )
  tokenizer = source.tokenizer()
  if args.eval_text is None:
    calib_tokens = int(np.prod(meta['calibration']['windows']))
    evals = _prose_split(tokenizer, calib_tokens, args.eval_tokens)[1]
  else:
    evals = _encode_file(tokenizer, args.eval_text)[-args.eval_tokens :]
  source.check_token_ids(evals, 'the evaluation tokens')
  model, params, meta = streaming.load_quantized(args.load)
  fp_module = llama.LlamaForCausalLM(source.config)
  fp = {
    name: source.params(name)
    for name in jax.eval_shape(
      fp_module.init, jax.random.key(0), np.zeros((1, 1), np.int32)
    )['params']
  }
  settings = streaming.Settings(**meta['settings'])
  score = lambda m, p: llama.perplexity(
    m, p, evals, common.WINDOW, progress=True
  )
  name = pathlib.Path(args.load).name + (' (source changed)' if changed else '')
  rows = [
    common.Row(
      name,
      'FP',
      '-',
      None,
      None,
      None,
      'perplexity',
      score(fp_module, fp),
      32.0,
      None,
    )
  ]
  bpw = report(fp, params).total()['bits_per_weight']
  params = pack_params(params) if args.pack else params
  rows.append(
    common.Row(
      name,
      common.METHOD_LABELS[settings.method]
      + ('' if meta['sequential'] else ' (no-sequential)'),
      settings.base,
      settings.bits,
      settings.tile_size,
      settings.rank,
      'perplexity',
      score(model, params),
      bpw,
      None,
    )
  )
  return rows
