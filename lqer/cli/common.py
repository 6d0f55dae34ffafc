"""What every `lqer` command shares: defaults, constants, the result row,
its table, and reading the user's files.

Each default is defined once, here; the commands' parsers and the task
builders refer to these names.
"""

import dataclasses
import json
import sys

import jax.numpy as jnp

from lqer.quant import bits
from lqer.quant.rule import FACTOR_QTYPES as _FACTOR_QTYPES

# SmolLM2 text comes in windows of this many tokens (calibration,
# evaluation, fine-tuning batches).
WINDOW = 512
# Calibration / held-out data: SmolLM2 tokens, MiniLM sentences.
DEFAULT_CALIB_TOKENS = 8192
DEFAULT_EVAL_TOKENS = 20480
DEFAULT_CALIB_SENTENCES = 256
DEFAULT_EVAL_SENTENCES = 512
# `lqer finetune` scores every init after each step count, so its held-out
# set is smaller than `lqer eval`'s (a different number on purpose).
DEFAULT_FINETUNE_EVAL_TOKENS = 8192

COMPUTE_DTYPES = {
  'float32': jnp.float32,
  'bfloat16': jnp.bfloat16,
  'auto': 'auto',
}
# --factor-bits: 16 stores A, B in bfloat16, else LqerRule's factor qtypes.
FACTOR_QTYPES = {
  16 if q is None else bits.qtype_bits(q): q for q in _FACTOR_QTYPES
}
# --bits: Qwix's integer qtypes.
WEIGHT_BITS = [2, 3, 4, 8]

METHOD_LABELS = {
  'svd': 'LQER',
  'l2qer': 'L2QER',
  'qera': 'QERA',
  'svdquant': 'SVDQuant',
  'smoothquant': 'SmoothQuant',
  'svdquant-qera': 'SVDQuant+QERA',
}
# Rows of `lqer eval` that need activation quantization (--act-bits).
ACT_METHODS = ('svdquant', 'smoothquant', 'svdquant-qera')
# SVDQuant's smoothing strength per (model, activation bits), searched with
# benchmarks/smooth_alpha.py on the calibration data (W4 g128 rank 32;
# 4-bit: SVDQuant alone, 8-bit: half the rank on QERA of the residual).
DEFAULT_SMOOTH_ALPHA = {
  ('smollm2', 4): 0.9,
  ('smollm2', 8): 0.3,
  ('minilm', 4): 0.6,
  ('minilm', 8): 0.3,
}


@dataclasses.dataclass
class Row:
  """One line of the comparison table (and one --json record)."""

  model: str
  method: str
  base: str
  bits: int | None
  tile_size: int | None
  rank: int | str | None  # 'auto': allocated under --budget
  metric: str
  value: float
  bits_per_weight: float | None
  offline_seconds: float | None
  extra: dict[str, float] = dataclasses.field(default_factory=dict)
  act_bits: int | None = None
  # Bits per weight minus the PTQ row's at the same base settings.
  extra_bits: float | None = None
  calib: int | None = None  # calibration tokens (smollm2) / sentences


def eval_table(rows) -> str:
  """Markdown table of `Row`s."""
  extra = sorted({k for r in rows for k in r.extra})
  act = any(r.act_bits for r in rows)
  calib = len({r.calib for r in rows}) > 1
  head = [
    'method',
    'base',
    'bits',
    *(['act bits'] if act else []),
    'group',
    'rank',
    *(['calib'] if calib else []),
    rows[0].metric,
    *extra,
    'bits/weight',
    'extra bits',
    'offline s',
  ]
  fmt = lambda v, f='{:.4f}': '-' if v is None else f.format(v)
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [
      r.method,
      r.base if r.method != 'FP' else '-',
      fmt(r.bits, '{}'),
      *([fmt(r.act_bits, '{}')] if act else []),
      fmt(r.tile_size, '{}'),
      fmt(r.rank, '{}'),
      *([fmt(r.calib, '{}')] if calib else []),
      fmt(r.value),
      *[fmt(r.extra.get(k)) for k in extra],
      fmt(r.bits_per_weight, '{:.2f}'),
      fmt(r.extra_bits, '{:.3f}'),
      fmt(r.offline_seconds, '{:.1f}'),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def read_text(path):
  """The UTF-8 text of a user's file (None: None)."""
  if path is None:
    return None
  from models import text  # pylint: disable=g-import-not-at-top

  return text.read_text_file(path)


def echo_command(name: str) -> None:
  """Print the command line, so a saved table says what made it."""
  print(f'# lqer {name}: {" ".join(sys.argv[1:])}', flush=True)


def write_json(path, records) -> None:
  """Write `records` (a list of dicts) to `path` (None: nothing)."""
  if path is not None:
    with open(path, 'w') as f:
      json.dump(records, f, indent=1)


def rows_json(path, rows) -> None:
  """Write `Row`s as one record each to `path` (None: nothing)."""
  write_json(path, [dataclasses.asdict(r) for r in rows])


def add_text_arguments(parser, eval_tokens: int) -> None:
  """--calib-text, --eval-text, --eval-tokens and --eval-sentences."""
  parser.add_argument('--calib-text', help='UTF-8 text file for calibration')
  parser.add_argument('--eval-text', help='UTF-8 text file for evaluation')
  parser.add_argument(
    '--eval-tokens',
    type=int,
    default=eval_tokens,
    help=f'smollm2 evaluation tokens (windows of {WINDOW})',
  )
  parser.add_argument(
    '--eval-sentences',
    type=int,
    default=DEFAULT_EVAL_SENTENCES,
    help='minilm evaluation sentences',
  )


def add_quantizer_arguments(parser) -> None:
  """--bits and --tile-size of one quantizer setting."""
  parser.add_argument('--bits', type=int, default=4, choices=WEIGHT_BITS)
  parser.add_argument(
    '--tile-size',
    type=int,
    default=128,
    help='per-group size (0 = per-channel); weights it does not divide'
    ' fall back to per-channel',
  )
