"""`lqer quantize` and `lqer eval --load` of its output directories.

    lqer quantize CHECKPOINT_DIR --out OUT_DIR --bits 4 --tile-size 128 \\
        --rank 32 --method qera [--base gptq] [--calib-text FILE] \\
        [--calib-tokens N] [--sequential | --no-sequential]

quantizes a Hugging Face checkpoint directory block by block
(`lqer.checkpoints.streaming`); `lqer eval --load OUT_DIR` scores the result
against
the float model it came from.
"""

import argparse
import pathlib
import time

import jax
import numpy as np

from lqer.checkpoints import streaming
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
  q.add_argument('--bits', type=int, default=4, choices=common.WEIGHT_BITS)
  q.add_argument(
    '--tile-size',
    type=int,
    default=128,
    help='per-group size (0 = per-channel); weights it does not'
    ' divide fall back to per-channel',
  )
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
    '--json',
    help='write the seconds per block and phase and the peak RSS to this file',
  )


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


def quantize_command(args):
  """Runs `lqer quantize`."""
  from models.hf_checkpoint import CheckpointDir  # pylint: disable=g-import-not-at-top

  if args.rank < 1 or args.calib_tokens < common.WINDOW:
    raise SystemExit(
      f'--rank must be positive and --calib-tokens at least {common.WINDOW}'
    )
  ckpt = CheckpointDir(args.checkpoint)
  settings = streaming.Settings(
    bits=args.bits,
    tile_size=args.tile_size or None,
    rank=args.rank,
    method=args.method,
    base=args.base,
    factor_qtype=common.FACTOR_QTYPES[args.factor_bits],
  )
  try:
    windows = calibration_windows(
      ckpt.tokenizer(), args.calib_text, args.calib_tokens
    )
  except ValueError as e:
    raise SystemExit(f'lqer quantize: {e}') from e
  common.echo_command('quantize')
  start = time.perf_counter()
  records = streaming.quantize_checkpoint(
    ckpt, args.out, settings, windows, sequential=args.sequential
  )
  common.write_json(args.json, records)
  print(
    f'wrote {args.out}: {ckpt.config.num_layers} blocks in'
    f' {(time.perf_counter() - start) / 60:.1f} min, peak RSS'
    f' {streaming.peak_rss_gb():.2f} GB'
  )


def is_quantized_dir(path) -> bool:
  """Whether `path` is a directory `lqer quantize` wrote."""
  return path is not None and (pathlib.Path(path) / streaming.META).is_file()


def eval_quantized_dir(args) -> list:
  """FP and quantized perplexity of an `lqer quantize` directory, on the
  bundled prose's held-out tokens (or --eval-text)."""
  from models import llama  # pylint: disable=g-import-not-at-top
  from models.hf_checkpoint import CheckpointDir  # pylint: disable=g-import-not-at-top

  model, params, meta = streaming.load_quantized(args.load)
  source = CheckpointDir(meta['source'])
  tokenizer = source.tokenizer()
  if args.eval_text is None:
    calib_tokens = int(np.prod(meta['calibration']['windows']))
    evals = _prose_split(tokenizer, calib_tokens, args.eval_tokens)[1]
  else:
    evals = _encode_file(tokenizer, args.eval_text)[-args.eval_tokens :]
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
  name = pathlib.Path(args.load).name
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
