"""Equal-bits baselines of `lqer eval --budget`: PTQ at the widths that
bracket the budget, and mixed precision under the same budget."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lqer
from lqer import _qwix
from lqer.cli import budget_rows
from lqer.cli import common
from lqer.cli import eval_tuning
from lqer.cli import main as cli
from lqer.cli import tasks
from lqer.offline import allocation
from lqer.quant import bits as bits_lib
from lqer.quant import recipes
from lqer.quant.rule import match_rule
from models import Transformer

MODEL = Transformer(d_model=32, num_heads=2, d_ff=64, num_layers=2, d_out=16)
BATCHES = [
  (jax.random.normal(jax.random.key(i), (2, 12, 16)),) for i in range(1, 4)
]


def _task():
  """The toy Transformer as an `lqer eval` task (relative output error)."""
  fp = MODEL.init(jax.random.key(0), BATCHES[0][0])['params']
  x = jax.random.normal(jax.random.key(9), (4, 12, 16))
  ref = MODEL.apply({'params': fp}, x)

  def score(module, params):
    y = module.apply({'params': params}, x)
    return {'err': float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))}

  return tasks.Task(
    'toy', MODEL, fp, (BATCHES[0][0][:1],), BATCHES, 'err', score, '.*'
  )


def test_weight_bits_are_qwix_int2_to_int8():
  assert common.WEIGHT_BITS == [2, 3, 4, 5, 6, 7, 8]
  assert [recipes.int_qtype(b) for b in (5, 6, 7)] == ['int5', 'int6', 'int7']
  assert [bits_lib.qtype_bits(recipes.int_qtype(b)) for b in range(2, 9)] == [
    2,
    3,
    4,
    5,
    6,
    7,
    8,
  ]
  args = cli.parser().parse_args(['eval', '--bits', '2', '5', '6', '7', '8'])
  assert args.bits == [2, 5, 6, 7, 8]
  with pytest.raises(SystemExit):
    cli.parser().parse_args(['eval', '--bits', '9'])


def test_bracketing_widths():
  """SmolLM2 W4 g128 is 4.10 bits per weight: + 0.75 lies between W4 and
  W5, + 1.5 between W5 and W6, + 1.0 is W5 itself; past W8 only W8."""
  bpw = {u: u + 0.1 for u in range(4, 9)}
  assert budget_rows.bracket_widths(bpw, 4.85) == [4, 5]
  assert budget_rows.bracket_widths(bpw, 5.60) == [5, 6]
  assert budget_rows.bracket_widths(bpw, 5.10) == [5]
  assert budget_rows.bracket_widths(bpw, 9.5) == [8]


def test_allocate_widths_is_the_greedy_over_the_convex_hull():
  options = {
    'a': [(0, 100.0), (10, 25.0), (20, 6.25)],
    'b': [(0, 10.0), (5, 2.5), (10, 0.6)],
    'c': [(0, 50.0), (10, 60.0)],  # wider is no better: never taken
    'd': [(0, 100.0), (10, 90.0), (20, 0.0)],  # (10, 90) is above the hull
  }
  # Per bit: d 0->2 5.0, a 0->1 7.5, a 1->2 1.875, b 0->1 1.5, b 1->2 0.38.
  got = allocation.allocate_widths(options, 45)
  assert got.index == {'a': 2, 'b': 1, 'c': 0, 'd': 2}
  assert (got.spent_bits, got.left_bits) == (45, 0)
  # A step that does not fit is skipped for a cheaper later one.
  got = allocation.allocate_widths(options, 15)
  assert got.index == {'a': 1, 'b': 1, 'c': 0, 'd': 0}
  assert allocation.allocate_widths(options, 0).index == dict.fromkeys(
    options, 0
  )


def test_mixed_rules_give_each_weight_its_width():
  task = _task()
  widths = {'block_0/fc1': 8, 'block_1/out': 6, 'head': 4}
  rules, handled = recipes.build_rules(
    task.params, '.*', 4, 16, None, 'svd', widths=widths
  )
  assert 'block_1/out' in handled['per-channel']
  for name, bits in {**widths, 'embed': 4, 'block_0/out': 4}.items():
    rule = match_rule(rules, (*name.split('/'), 'kernel'))
    assert bits_lib.qtype_bits(rule.weight_qtype) == bits
    assert rule.tile_size == (None if name.endswith('out') else 16)
  with pytest.raises(ValueError, match='not a kernel'):
    recipes.build_rules(task.params, '.*', 4, 16, None, 'svd', widths={'x': 5})


@functools.lru_cache(maxsize=None)
def _equal_bits(budget):
  task = _task()
  rules = recipes.build_rules(task.params, '.*', 4, 16, 1, 'qera')[0]
  stats = tasks.calibration_statistics(task, rules)
  stats = tasks.gradient_statistics(task, rules, stats)
  ptq = tasks.quantize(
    task, recipes.build_rules(task.params, '.*', 4, 16, None, 'svd')[0], stats
  )[1]
  rows = list(budget_rows.equal_bits_rows(task, 4, 16, budget, stats))
  return task, ptq, rows


def test_equal_bits_rows_count_bits_as_the_report_does():
  """W4 g16 + 0.75 bits: PTQ W5 (W4 is the PTQ row), then the mixed row,
  whose bits per weight (by lqer.report) are within one weight's cost
  below the budget; every row's bits are the report's."""
  task, ptq, rows = _equal_bits(0.75)
  assert [(r.method, r.bits) for r in rows[:-1]] == [('PTQ', 5)]
  assert rows[-1].method == 'PTQ mixed'
  total = lambda p: lqer.report(task.params, p).total()
  base = total(ptq)
  for r in rows:
    assert r.bits_per_weight == pytest.approx(
      total(r.params)['bits_per_weight'], abs=1e-12
    )
  # Uniform W5: one more bit for every weight, the same scales.
  assert rows[0].bits_per_weight == pytest.approx(
    base['bits_per_weight'] + 1, abs=1e-12
  )
  n = base['num_weights']
  target = base['bits_per_weight'] + 0.75
  mixed = rows[-1].bits_per_weight
  sizes = [
    int(np.prod(w.shape))
    for w in jax.tree.leaves(task.params)
    if np.ndim(w) >= 2
  ]
  assert mixed <= target
  assert (target - mixed) * n < max(sizes)  # a one-bit step of any weight
  # Each weight's width, as the rows' label lists them.
  flat = flax.traverse_util.flatten_dict(rows[-1].params)
  used = sorted(
    {
      bits_lib.qtype_bits(q.array.qtype)
      for q in flat.values()
      if isinstance(q, _qwix.WithAux)
    }
  )
  assert rows[-1].bits == '/'.join(map(str, used)) and used[0] >= 4
  assert len(used) > 1
  # More base bits where the damage is: the mixed row beats PTQ W4.
  score = lambda p: task.score(rows[-1].model, p)['err']
  assert score(rows[-1].params) < score(ptq)


def _row(method, value, extra, bits=4, rank=None, budget=0.75):
  return common.Row(
    'toy',
    method,
    'rtn',
    bits,
    128,
    rank,
    'perplexity',
    value,
    32.0 if extra is None else 4.1 + extra,
    1.0,
    extra_bits=extra,
    budget=budget,
  )


def test_the_winner_is_marked_among_rows_within_the_budget():
  rows = [
    _row('FP', 11.0, None, bits=None, budget=None),
    _row('PTQ', 20.0, 0.0),
    _row('QERA', 12.3, 0.75, rank='auto'),
    _row('QERA', 12.4, 0.752, rank=65),  # the nearest uniform rank
    _row('PTQ', 11.9, 1.0, bits=5),  # more bits: not a candidate
    _row('PTQ mixed', 12.6, 0.749, bits='4/5/8'),
  ]
  common.mark_best(rows)
  assert [r.best for r in rows] == [False, False, True, False, False, False]
  table = common.eval_table(rows)
  assert '| QERA | rtn | 4 | 128 | auto | **12.3000** |' in table
  assert '| PTQ mixed | rtn | 4/5/8 |' in table
  (line,) = common.budget_summary(rows)
  assert line.startswith('budget 0.75 extra bits (W4, 4.85 bits/weight):')
  assert 'QERA rank auto wins, 12.3000 against PTQ mixed W4/5/8 12.6000' in line
  assert 'PTQ W5 at 5.10 bits/weight: 11.9000' in line
  rows[-1].value = 12.0
  common.mark_best(rows)
  assert rows[-1].best and not rows[2].best
  assert 'PTQ mixed W4/5/8 wins' in common.budget_summary(rows)[0]


@pytest.mark.parametrize(
  'flags,message',
  [
    (['--tune-steps', '-1'], '--tune-steps must be >= 0'),
    (['--tune-tokens', '512'], 'need --tune-steps'),
    (['--tune-steps', '4', '--tune-tokens', '9000'], 'calibration'),
    (
      ['--tune-steps', '4', '--tune-tokens', '600', '--calib-tokens', '512'],
      'calibration',
    ),
    (['--tune-steps', '4', '--tune-lr', '0'], '--tune-lr'),
    (['--tune-steps', '4', '--load', 'somewhere'], 'not with --load'),
  ],
)
def test_cli_refuses_bad_tuning_flags_before_loading(
  flags, message, monkeypatch
):
  def load(*args, **kwargs):
    raise AssertionError('the model was loaded')

  monkeypatch.setitem(tasks.TASKS, 'smollm2', load)
  with pytest.raises(SystemExit, match=message):
    cli.main(['eval', *flags])


def test_budget_rows_spend_bits_on_factors_widths_or_both():
  """lqer eval --budget --tune-steps: the allocated, uniform and '+mixed'
  (factors on wider weights) rows, the allocated and '+mixed' ones also
  tuned, and the equal-bits PTQ rows, each within the budget as the report
  counts bits, each with its calibration divergence; the budget's choice
  by it is reported."""
  from lqer.cli import eval as eval_cli  # pylint: disable=g-import-not-at-top

  task = _task()
  tune = eval_tuning.Tuning(steps=4, tokens=24, lr=3e-3)
  rows = list(
    eval_cli.eval_rows(task, 4, 16, [], ['qera'], budget=0.75, tune=tune)
  )
  assert [r.method for r in rows] == [
    'FP',
    'PTQ',
    'QERA',
    'QERA tuned',
    'QERA',
    'QERA +mixed',
    'QERA +mixed tuned',
    'PTQ',
    'PTQ mixed',
  ]
  # A tuned row keeps its row's bits (widths, ranks, bits per weight) and
  # lowers the calibration divergence, the objective the tuning lowered.
  for untuned, tuned in ((rows[2], rows[3]), (rows[5], rows[6])):
    assert (tuned.bits, tuned.rank) == (untuned.bits, untuned.rank)
    assert tuned.bits_per_weight == untuned.bits_per_weight
    assert tuned.tuning['steps'] == 4
    div = budget_rows.CALIB_DIV
    assert tuned.extra[div] < untuned.extra[div], (tuned, untuned)
  mixed = rows[5]
  assert mixed.rank == 'auto' and mixed.bits.startswith('4/')
  for r in rows[1:]:
    assert budget_rows.CALIB_DIV in r.extra and r.budget == 0.75
    if r.rank in (None, 'auto') and r.bits != 5:  # not W5, nor the
      assert common.within_budget(r), r  # nearest uniform rank (toy: 1)
  # Factors and wider weights together: both kinds of bits in the row.
  assert 0 < mixed.extra_bits <= 0.75 + common.BUDGET_SLACK
  common.mark_best(rows)
  (line,) = budget_rows.budget_choice(rows)
  assert line.startswith('budget 0.75: the calibration divergence chooses')
  chosen = min(
    (r for r in rows[1:] if common.within_budget(r)),
    key=lambda r: r.extra[budget_rows.CALIB_DIV],
  )
  assert chosen.method in line
