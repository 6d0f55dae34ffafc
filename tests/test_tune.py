"""lqer.tune_factors: factors tuned to the float model's output."""

import functools

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

import lqer
from lqer.checkpoints import tree as checkpoint
from lqer.cli import tasks
from models import NnxTransformer
from models import Transformer
from tests import nnx_flow

KEY = jax.random.key(0)
MODEL = Transformer(d_model=32, num_heads=2, d_ff=64, num_layers=1, d_out=16)
BATCHES = [
  (jax.random.normal(jax.random.key(i), (2, 12, 16)),) for i in range(1, 5)
]


@functools.lru_cache(maxsize=None)
def _quantized(factor_qtype):
  """(fp params, LQER model, params, statistics, rules), W4 g16 rank 4."""
  fp = MODEL.init(KEY, BATCHES[0][0])['params']
  rules = [
    lqer.LqerRule(
      module_path='.*',
      weight_qtype='int4',
      tile_size=16,
      rank=4,
      method='qera',
      factor_qtype=factor_qtype,
    )
  ]
  cal = qwix.quantize_model(MODEL, lqer.LqerCalibrationProvider(rules))
  stats = lqer.calibrate(cal, fp, BATCHES)
  model = qwix.quantize_model(
    MODEL, lqer.LqerProvider(rules, compute_dtype=jnp.float32)
  )
  abstract = jax.eval_shape(model.init, KEY, BATCHES[0][0])['params']
  params = lqer.lqer_quantize_params(fp, abstract, calibration=stats)
  return fp, model, params, stats, rules


def _tune(factor_qtype, output='mse', seed=0, steps=16, **kw):
  fp, model, params, stats, _ = _quantized(factor_qtype)
  return lqer.tune_factors(
    lambda p, x: model.apply({'params': p}, x),
    fp,
    params,
    BATCHES,
    steps=steps,
    lr=kw.pop('lr', 3e-3),
    output=output,
    seed=seed,
    fp_apply_fn=lambda p, x: MODEL.apply({'params': p}, x),
    **kw,
  )


def _weights(params):
  flat = flax.traverse_util.flatten_dict(params)
  return {p: w for p, w in flat.items() if isinstance(w, lqer.WithLqer)}


@functools.lru_cache(maxsize=None)
def _tuned(factor_qtype, output):
  """Tuned 16 steps; with float factors, the report's output errors too."""
  stats = _quantized(factor_qtype)[3] if factor_qtype is None else None
  return _tune(factor_qtype, output, calibration=stats)


@pytest.mark.parametrize(
  'factor_qtype,output', [(None, 'softmax'), ('int4', 'mse')]
)
def test_tuning_lowers_the_calibration_objective(factor_qtype, output):
  """Seeded: the objective over the calibration batches drops, and the
  last steps' losses are below the first steps'."""
  _, record = _tuned(factor_qtype, output)
  assert record.steps == len(record.losses) == 16
  assert record.kept
  assert record.objective_after < 0.9 * record.objective_before
  assert np.mean(record.losses[-4:]) < np.mean(record.losses[:4])
  if factor_qtype is not None:
    assert record.output_error is None  # no calibration given
    return
  # The per-weight output errors of the report, before and after.
  before, after = record.output_error['TOTAL']
  assert before > 0 and after > 0
  assert len(record.output_error) == 1 + len(
    _weights(_quantized(factor_qtype)[2])
  )


def test_tuning_never_touches_the_base():
  fp, _, params, _, _ = _quantized('int4')
  tuned, _ = _tuned('int4', 'mse')
  old, new = _weights(params), _weights(tuned)
  assert old.keys() == new.keys()
  changed = 0
  for path, w in old.items():
    t = new[path]
    assert t.array is w.array and t.input_scale is w.input_scale
    assert getattr(t, 'rotation', None) is getattr(w, 'rotation', None)
    assert t.rule == w.rule and t.path == w.path
    # Stored as the rule stores them: int4 values, bfloat16 scales.
    assert t.a.dtype == w.a.dtype == jnp.int4
    assert t.a_scale.dtype == w.a_scale.dtype == jnp.bfloat16
    assert t.a.shape == w.a.shape and t.b_scale.shape == w.b_scale.shape
    changed += not np.array_equal(
      np.asarray(t.b, np.int8), np.asarray(w.b, np.int8)
    )
  assert changed
  # Everything that is not a quantized weight is the same object.
  flat_old = flax.traverse_util.flatten_dict(params)
  for path, leaf in flax.traverse_util.flatten_dict(tuned).items():
    if not isinstance(leaf, lqer.WithLqer):
      assert leaf is flat_old[path]


def test_objective_after_is_that_of_the_stored_factors():
  """The record's objective after tuning is measured on the factors as
  returned (rounded to int4), and tuning 0 steps changes nothing."""
  tuned, record = _tuned('int4', 'mse')
  _, again = _tune('int4', steps=0, calibration=None)
  fp, model, params, _, _ = _quantized('int4')
  assert again.objective_after == pytest.approx(again.objective_before)
  assert again.objective_before == pytest.approx(record.objective_before)
  total = norm = 0.0
  for (x,) in BATCHES:
    y = model.apply({'params': tuned}, x)
    ref = MODEL.apply({'params': fp}, x)
    total += float(jnp.sum(jnp.square(y - ref)))
    norm += float(jnp.sum(jnp.square(ref)))
  assert total / norm == pytest.approx(record.objective_after, rel=1e-4)


def test_factors_that_raise_the_objective_are_not_kept():
  _, _, params, _, _ = _quantized('int4')
  out, record = _tune('int4', steps=3, lr=30.0)
  assert record.objective_after > record.objective_before
  assert not record.kept and out is params


def test_tuning_is_deterministic_for_a_seed():
  tuned, record = _tuned(None, 'softmax')
  again, record2 = _tune(None, 'softmax')
  assert record2.losses == record.losses
  for path, w in _weights(tuned).items():
    np.testing.assert_array_equal(
      np.asarray(w.a, np.float32),
      np.asarray(_weights(again)[path].a, np.float32),
    )
  _, other = _tune(None, 'softmax', seed=1, steps=4)
  assert other.losses != record.losses[:4]  # another batch order


def test_tuned_factors_round_trip(tmp_path):
  """Tuned (float) factors: checkpoint save / load, pack_params and
  to_lora give the tuned model."""
  fp, model, params, _, rules = _quantized(None)
  tuned, _ = _tuned(None, 'softmax')
  x = BATCHES[0][0]
  y = model.apply({'params': tuned}, x)
  fingerprint = {'test': 'tune'}
  checkpoint.save(tmp_path, tuned, fingerprint)
  abstract = jax.eval_shape(model.init, KEY, x)['params']
  loaded = checkpoint.load(tmp_path, abstract, fingerprint)
  for path, w in _weights(tuned).items():
    got = _weights(loaded)[path]
    for field in ('a', 'b'):
      np.testing.assert_array_equal(
        np.asarray(getattr(got, field), np.float32),
        np.asarray(getattr(w, field), np.float32),
      )
  np.testing.assert_allclose(
    model.apply({'params': loaded}, x), y, rtol=1e-5, atol=1e-5
  )
  packed = lqer.pack_params(tuned)
  np.testing.assert_allclose(
    model.apply({'params': packed}, x), y, rtol=2e-2, atol=2e-2
  )
  lrules = lqer.lora_rules(rules, 8.0)
  lora_model = qwix.apply_lora_to_model(MODEL, qwix.LoraProvider(lrules))
  lora_abstract = jax.eval_shape(lora_model.init, KEY, x)['params']
  lora = lqer.to_lora(tuned, lora_abstract, lrules)
  y_lora = lora_model.apply({'params': lora}, x)
  assert float(jnp.linalg.norm(y_lora - y) / jnp.linalg.norm(y)) < 1e-2
  # ... and not the closed form's.
  y_closed = model.apply({'params': params}, x)
  assert float(jnp.linalg.norm(y_lora - y_closed)) > float(
    jnp.linalg.norm(y_lora - y)
  )


def test_bad_arguments_are_refused():
  fp, model, params, _, _ = _quantized(None)
  apply = lambda p, x: model.apply({'params': p}, x)
  with pytest.raises(ValueError, match='output='):
    lqer.tune_factors(apply, fp, params, BATCHES, steps=1, output='kl')
  with pytest.raises(ValueError, match='steps'):
    lqer.tune_factors(apply, fp, params, BATCHES, steps=-1)
  with pytest.raises(ValueError, match='lr'):
    lqer.tune_factors(apply, fp, params, BATCHES, steps=1, lr=0.0)
  with pytest.raises(ValueError, match='no batches'):
    lqer.tune_factors(apply, fp, params, [], steps=1)
  with pytest.raises(ValueError, match='carries factors'):
    lqer.tune_factors(apply, fp, fp, BATCHES, steps=1)
  with pytest.raises(TypeError, match='nnx.split'):
    lqer.tune_factors(apply, fp, nnx.Module(), BATCHES, steps=1)


def test_nnx_split_state_is_tuned():
  """NNX: the split model's state is tuned (its WithLqer weights are State
  nodes there) and nnx.update puts the tuned factors in the model."""
  x = BATCHES[0][0]
  make = lambda: NnxTransformer(
    d_model=32, num_heads=2, d_ff=64, num_layers=1, d_out=16, rngs=nnx.Rngs(1)
  )
  rules = [
    lqer.LqerRule(
      module_path='.*',
      weight_qtype='int4',
      tile_size=16,
      rank=4,
      method='qera',
      factor_qtype='int8',
    )
  ]
  model, _, _ = nnx_flow.quantized(make, rules, x)
  fp_model = make()
  graphdef, state = nnx.split(model)
  fp_graphdef, fp_state = nnx.split(fp_model)
  tuned, record = lqer.tune_factors(
    lambda s, *b: nnx.merge(graphdef, s)(*b),
    fp_state,
    state,
    [(x,)],
    steps=8,
    lr=3e-3,
    output='mse',
    fp_apply_fn=lambda s, *b: nnx.merge(fp_graphdef, s)(*b),
  )
  assert record.kept and record.objective_after < record.objective_before
  nnx.update(model, tuned)
  ref = fp_model(x)
  moved = float(jnp.sum(jnp.square(model(x) - ref)) / jnp.sum(jnp.square(ref)))
  assert moved == pytest.approx(record.objective_after, rel=1e-4)


def test_tuning_tokens_come_from_calibration_only():
  """SmolLM2's tuning windows are calibration tokens: on a stream of
  positions, their tokens and the evaluation's are disjoint, with the
  default split and with one text file for both."""
  prose = np.arange(10_000, dtype=np.int32)
  for calib_text, eval_text in [(None, None), ('same', 'same')]:
    calib, evals, _ = tasks.split_smollm2_tokens(
      prose, calib_text, eval_text, 4096, 2048, encode=lambda t: prose
    )
    windows = tasks.tuning_windows(calib, 1500, 512)
    tuned = np.concatenate([w[0].ravel() for w in windows])
    assert len(tuned) == 1500
    assert set(tuned) <= set(calib)
    assert not set(tuned) & set(evals)
    assert not set(calib) & set(evals)
  with pytest.raises(ValueError, match='overlap'):
    tasks.split_smollm2_tokens(
      prose, 'same', 'same', 8000, 4000, encode=lambda t: prose
    )
  with pytest.raises(ValueError, match='calibration'):
    tasks.tuning_windows(calib, 5000, 512)


def test_streamed_blocks_are_tuned_and_round_trip(tmp_path):
  """lqer quantize --tune-steps: each block's factors tuned to the float
  block's output on its own (quantized-path) inputs; the objective drops
  per block, lqer.json records the tuning (a resume with other tuning is
  refused), and the tuned factors load, pack and convert to LoRA."""
  from lqer.checkpoints import streaming  # pylint: disable=g-import-not-at-top
  from models import llama  # pylint: disable=g-import-not-at-top
  from tests import test_streaming  # pylint: disable=g-import-not-at-top

  config = test_streaming.tiny_config(num_layers=2)
  test_streaming.write_tiny(tmp_path / 'src', config)
  ids = test_streaming._calib_ids()  # pylint: disable=protected-access
  settings = test_streaming.SETTINGS
  tuning = streaming.BlockTuning(steps=6, tokens=96, lr=3e-3)
  run = lambda out, tuning: streaming.quantize_checkpoint(
    tmp_path / 'src', out, settings, ids, progress=False, tuning=tuning
  )
  records = run(tmp_path / 'tuned', tuning)
  for r in records:
    assert r['tune_kept'] and r['tune_after'] < r['tune_before'], r
    assert r['tune_s'] > 0
  run(tmp_path / 'closed', None)
  model, tuned, meta = streaming.load_quantized(tmp_path / 'tuned')
  assert meta['tuning'] == {'steps': 6, 'tokens': 96, 'lr': 3e-3, 'seed': 0}
  closed = streaming.load_quantized(tmp_path / 'closed')[1]
  k = lambda p, i: p[f'layers_{i}']['mlp']['down_proj']['kernel']
  for i in range(2):
    assert not np.allclose(
      np.asarray(k(tuned, i).a, np.float32),
      np.asarray(k(closed, i).a, np.float32),
    )
    np.testing.assert_array_equal(  # bases frozen
      k(tuned, i).array.qvalue, k(closed, i).array.qvalue
    )
  with pytest.raises(checkpoint.CheckpointError, match='tuning'):
    run(tmp_path / 'tuned', streaming.BlockTuning(steps=4, tokens=96))
  x = test_streaming._calib_ids(2, 16, seed=1)  # pylint: disable=protected-access
  y = model.apply({'params': tuned}, x)
  packed = streaming.load_quantized(tmp_path / 'tuned', pack=True)[1]
  np.testing.assert_allclose(
    model.apply({'params': packed}, x), y, atol=1e-4 * np.abs(y).max()
  )
  lrules = lqer.lora_rules(settings.rules(config), 8.0)
  lora_model = qwix.apply_lora_to_model(
    llama.LlamaForCausalLM(config), qwix.LoraProvider(lrules)
  )
  lora_abstract = jax.eval_shape(lora_model.init, KEY, x)['params']
  lora = lqer.to_lora(tuned, lora_abstract, lrules)
  y_lora = lora_model.apply({'params': lora}, x)
  assert float(jnp.linalg.norm(y_lora - y) / jnp.linalg.norm(y)) < 1e-2
  with pytest.raises(ValueError, match='steps'):
    streaming.BlockTuning(steps=0, tokens=96)


@pytest.mark.parametrize(
  'flags,message',
  [
    (['--tune-steps', '-1'], '--tune-steps must be >= 0'),
    (['--tune-tokens', '512'], 'needs --tune-steps'),
    (['--tune-steps', '4', '--tune-tokens', '9000'], 'calibration tokens'),
    (['--tune-steps', '4', '--tune-lr', '0'], '--tune-lr'),
  ],
)
def test_quantize_refuses_bad_tuning_flags_before_reading(flags, message):
  from lqer.cli import main as cli  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit, match=message):
    cli.main(['quantize', '/nonexistent', '--out', '/nonexistent2', *flags])


def test_output_divergence_is_the_tuning_objective():
  """The budget rows' calibration divergence is tune_factors' objective
  (of any params; zero for the float model itself)."""
  from lqer.offline.tune import output_divergence  # pylint: disable=g-import-not-at-top

  fp, model, params, _, _ = _quantized(None)
  fp_apply = lambda p, x: MODEL.apply({'params': p}, x)
  for output in ('mse', 'softmax'):
    _, record = _tune(None, output, steps=0)
    got = output_divergence(
      lambda p, x: model.apply({'params': p}, x),
      params,
      fp_apply,
      fp,
      BATCHES,
      output,
    )
    assert got == pytest.approx(record.objective_before, rel=1e-5)
    assert output_divergence(fp_apply, fp, fp_apply, fp, BATCHES, output) == 0
  with pytest.raises(ValueError, match='output='):
    output_divergence(fp_apply, fp, fp_apply, fp, BATCHES, 'kl')
