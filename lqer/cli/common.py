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
# --bits: Qwix's integer qtypes (int2 ... int8).
WEIGHT_BITS = [2, 3, 4, 5, 6, 7, 8]
# --tune-steps: tokens (smollm2, windows of WINDOW) or sentences (minilm)
# of the calibration data the factors are tuned on, and Adam's peak rate
# (16 steps, int4 factors, QERA rank 32: MiniLM gained at 3e-4 and diverged
# at 1e-3; 3 blocks of SmolLM2 gained at 1e-3 and 2e-3).
DEFAULT_TUNE_TOKENS = 2048
DEFAULT_TUNE_SENTENCES = 64
DEFAULT_TUNE_LR = 3e-4
# A row spending at most this many extra bits over a budget still counts
# as spending it (the uniform rank is the nearest, not the one below).
BUDGET_SLACK = 0.01

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
  bits: int | str | None  # str: the widths of a mixed-precision row
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
  # --budget: the budget (extra bits per weight) this row is compared at;
  # None: not part of a budget's comparison.
  budget: float | None = None
  # The best row at its budget (`mark_best`): lowest metric among the rows
  # spending at most the budget.
  best: bool = False
  # --tune-steps: what tuning did (`lqer.TuneRecord`'s numbers).
  tuning: dict | None = None


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
      fmt(r.value, '**{:.4f}**' if r.best else '{:.4f}'),
      *[fmt(r.extra.get(k)) for k in extra],
      fmt(r.bits_per_weight, '{:.2f}'),
      fmt(r.extra_bits, '{:.3f}'),
      fmt(r.offline_seconds, '{:.1f}'),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def is_ptq(row: Row) -> bool:
  """Whether a row is plain PTQ (uniform or mixed bits), not a method."""
  return row.method != 'FP' and row.rank is None


def within_budget(row: Row) -> bool:
  """Whether a budget's row spends at most its budget (`BUDGET_SLACK`)."""
  return (
    row.budget is not None
    and row.extra_bits is not None
    and row.extra_bits <= row.budget + BUDGET_SLACK
  )


def _budget_groups(rows) -> dict:
  """{(base bits per weight, act bits, calib, budget): rows compared at
  that budget}; the base is the PTQ row the extra bits are counted from."""
  groups = {}
  for r in rows:
    if r.budget is not None and r.extra_bits is not None:
      base = round(r.bits_per_weight - r.extra_bits, 6)
      key = (base, r.act_bits, r.calib, r.budget)
      groups.setdefault(key, []).append(r)
  return groups


def mark_best(rows) -> None:
  """Sets `best` on each budget's winner: the lowest metric (perplexity,
  1 - cos: lower is better) among its rows spending at most the budget
  (`within_budget`), factors or PTQ at more bits alike."""
  for group in _budget_groups(rows).values():
    for r in group:
      r.best = False
    fair = [r for r in group if within_budget(r)]
    if fair:
      min(fair, key=lambda r: r.value).best = True


def budget_summary(rows) -> list[str]:
  """One line per budget: its bits per weight, the best row with factors,
  the best PTQ row (uniform or mixed) within the same bits, which wins, and
  the PTQ row at the next width up for reference."""
  lines = []
  label = lambda r: (
    f'{r.method} W{r.bits}' if is_ptq(r) else f'{r.method} rank {r.rank}'
  )
  for (base_bpw, _, calib, budget), group in _budget_groups(rows).items():
    fair = [r for r in group if within_budget(r)]
    lqer_rows = [r for r in fair if not is_ptq(r)]
    ptq_rows = [r for r in fair if is_ptq(r)]
    if not lqer_rows or not ptq_rows:
      continue
    best = min(lqer_rows, key=lambda r: r.value)
    ptq = min(ptq_rows, key=lambda r: r.value)
    win = best if best.value <= ptq.value else ptq
    lose = ptq if win is best else best
    line = (
      f'budget {budget:g} extra bits (W{best.bits}, {base_bpw + budget:.2f}'
      f' bits/weight{f", calib {calib}" if calib else ""}): {label(win)}'
      f' wins, {win.value:.4f} against {label(lose)} {lose.value:.4f}'
      + (
        f' ({(lose.value / win.value - 1) * 100:.1f} % higher)'
        if win.value > 0
        else ''
      )
    )
    above = [r for r in group if is_ptq(r) and not within_budget(r)]
    if above:
      r = min(above, key=lambda r: r.bits_per_weight)
      line += (
        f'; {label(r)} at {r.bits_per_weight:.2f} bits/weight: {r.value:.4f}'
      )
    lines.append(line)
  return lines


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


def add_head_argument(parser) -> None:
  """--quantize-head (SmolLM2)."""
  parser.add_argument(
    '--quantize-head',
    action='store_true',
    help='smollm2: untie the LM head from the embedding table (a copy, the'
    ' lookup stays float) and quantize it like the projections; it is 60 %%'
    ' of the float32 bytes a decode step reads',
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
