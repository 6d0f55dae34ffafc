"""Bad input and corner cases a user meets (issue: nothing silently wrong):
rule fields, SVDQuant channels calibration never saw, NNX params through
the report and calibration, empty batches."""

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

import lqer
from lqer.core import decompose
from models import NnxTransformer
from models import Transformer
from tests import reference

KEY = jax.random.key(0)


def _rule(**kw):
  return lqer.LqerRule(
    **{'module_path': '.*', 'weight_qtype': 'int4', 'rank': 8, **kw}
  )


def test_rule_regex_is_checked_at_construction():
  with pytest.raises(ValueError, match=r"module_path: 'up\[' is not a valid"):
    _rule(module_path='up[')


@pytest.mark.parametrize(
  'field, value',
  [
    ('qera_damping', float('nan')),
    ('qera_damping', float('inf')),
    ('smooth_alpha', float('nan')),
    ('rank', 1.5),
    ('oversample', -1),
  ],
)
def test_rule_numbers_are_checked_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf'\.{field}: must be'):
    _rule(**{field: value})


def test_rule_accepts_numpy_scalars_as_numbers():
  rule = _rule(
    rank=np.int64(8),
    tile_size=np.int32(16),
    smooth_alpha=np.float32(0.5),
    qera_damping=np.float64(0.01),
    seed=np.int64(3),
  )
  assert (rule.rank, rule.tile_size, rule.seed) == (8, 16, 3)
  assert type(rule.rank) is int and type(rule.smooth_alpha) is float
  assert rule == _rule(rank=8, tile_size=16, smooth_alpha=0.5, seed=3)


def test_smoothing_keeps_lam_one_where_calibration_saw_nothing():
  """A channel that is zero throughout calibration has no evidence to move
  it: lam = 1 there (NumPy formula elsewhere)."""
  rng = np.random.default_rng(0)
  x_max = np.abs(rng.normal(size=64)).astype(np.float32) + 0.1
  x_max[[3, 40]] = 0.0
  w = rng.normal(size=(64, 32)).astype(np.float32)
  lam = np.asarray(decompose.smoothing_scale(jnp.asarray(x_max), w, 0.7))
  want = x_max**0.7 / np.abs(w).max(1) ** 0.3
  want[[3, 40]] = 1.0
  np.testing.assert_allclose(lam, want, rtol=1e-5)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name='proj')(x)


def test_svdquant_channel_unseen_in_calibration_is_safe_and_reported():
  """W4A4 SVDQuant on inputs whose channel 5 is zero in every calibration
  token: when that channel fires at inference the error stays at PTQ's
  level or below (it was 3.2x PTQ's with lam = 5e-3 there), and the report
  names the weight with one unseen channel."""
  rng = np.random.default_rng(1)
  x_cal = reference.correlated_outlier_activations(rng, 512, 128)
  x_cal[:, 5] = 0.0
  x_test = reference.correlated_outlier_activations(rng, 256, 128)
  model = _Dense()
  fp = model.init(KEY, x_cal)['params']
  errors = {}
  for method, rank in (('svdquant', 8), ('svdquant', None)):
    rules = [
      lqer.LqerRule(
        module_path='.*',
        weight_qtype=jnp.int4,
        act_qtype=jnp.int4,
        tile_size=32,
        rank=rank,
        method=method,
      )
    ]
    cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
    stats = lqer.calibrate(cal, fp, [(jnp.asarray(x_cal),)])
    qmodel = qwix.quantize_model(model, lqer.LqerProvider(rules))
    abstract = jax.eval_shape(qmodel.init, KEY, x_cal)['params']
    params = lqer.lqer_quantize_params(fp, abstract, calibration=stats)
    y = qmodel.apply({'params': params}, x_test)
    ref = model.apply({'params': fp}, x_test)
    errors[rank] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    if rank:
      np.testing.assert_array_equal(params['proj']['kernel'].input_scale[5], 1)
      report = lqer.report(fp, params, stats)
      assert report.layers[0].unseen_channels == 1
      assert 'never saw' in report.table() and 'proj/kernel (1)' in (
        report.table()
      )
  assert errors[8] < errors[None], errors


@pytest.fixture(scope='module')
def nnx_case():
  x = jax.random.normal(KEY, (2, 16, 16))
  rules = [_rule(tile_size=16, method='qera')]
  cal = qwix.quantize_model(
    NnxTransformer(rngs=nnx.Rngs(0)), lqer.LqerCalibrationProvider(rules), x
  )
  return x, rules, cal


def test_calibrate_runs_nnx_models_as_the_eager_flow_does(nnx_case):
  x, rules, cal = nnx_case
  stats = lqer.calibrate(cal, None, [(x,), (2 * x,)])
  eager = qwix.quantize_model(
    NnxTransformer(rngs=nnx.Rngs(0)), lqer.LqerCalibrationProvider(rules), x
  )
  for batch in (x, 2 * x):
    eager(batch)
  want = nnx.to_pure_dict(nnx.state(eager, qwix.QuantStat))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max())
    ),
    stats,
    want,
  )
  with pytest.raises(TypeError, match='NNX model holds its params'):
    lqer.calibrate(cal, {'w': x}, [(x,)])


@pytest.mark.parametrize(
  'batches, message',
  [
    ([], 'no batches'),
    ([(jnp.zeros((0, 16, 16)),)], 'batch 0 has an input with no elements'),
  ],
)
def test_calibrate_refuses_no_batches_or_no_tokens(nnx_case, batches, message):
  _, _, cal = nnx_case
  with pytest.raises(ValueError, match=message):
    lqer.calibrate(cal, None, batches)


def test_report_of_the_nnx_pure_dict_names_what_to_pass(nnx_case):
  x, rules, cal = nnx_case
  stats = lqer.calibrate(cal, None, [(x,)])
  model = NnxTransformer(rngs=nnx.Rngs(0))
  q_model = nnx.eval_shape(
    lambda: qwix.quantize_model(model, lqer.LqerProvider(rules), x)
  )
  fp = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  q = lqer.lqer_quantize_params(fp, q_model, calibration=stats)
  with pytest.raises(TypeError, match='pure dict .* pass the quantized NNX'):
    lqer.report(fp, q, stats)
  nnx.update(q_model, q)
  report = lqer.report(fp, q_model, stats)
  assert report.layers and not report.left_float
  assert all(l.rank == 8 for l in report.layers)


@pytest.mark.parametrize('pack', [False, True])
def test_empty_batch_gives_an_empty_output_as_float_does(pack):
  model = Transformer()
  x = jax.random.normal(KEY, (2, 16, 16))
  fp = model.init(KEY, x)['params']
  rules = [_rule(tile_size=16)]
  qmodel = qwix.quantize_model(model, lqer.LqerProvider(rules))
  params = lqer.lqer_quantize_params(
    fp, jax.eval_shape(qmodel.init, KEY, x)['params']
  )
  params = lqer.pack_params(params) if pack else params
  y = jax.jit(qmodel.apply)({'params': params}, x[:0])
  assert y.shape == model.apply({'params': fp}, x[:0]).shape == (0, 16, 32)


def test_eval_load_typo_fails_before_any_model_loads(monkeypatch, tmp_path):
  from lqer.cli import main as cli  # pylint: disable=g-import-not-at-top
  from lqer.cli import tasks  # pylint: disable=g-import-not-at-top

  def no_model(*args, **kwargs):
    raise AssertionError('a model was loaded')

  monkeypatch.setitem(tasks.TASKS, 'minilm', no_model)
  with pytest.raises(FileNotFoundError, match='typo'):
    cli.main(['eval', '--model', 'minilm', '--load', str(tmp_path / 'typo')])
  args = cli.parser().parse_args(['eval', '--load', 'out', '--force'])
  assert args.force
