"""Linen x NNX over the public API (issue 29, NNX parity): the same weights
go through calibrate -> lqer_quantize_params -> report -> pack_params ->
checkpoint save/load -> to_lora -> training steps -> from_lora once as a
Linen module and once as its NNX twin, and every stage gives the same
numbers in both. The model has a Dense, a DenseGeneral with two output axes
and a Dense back. (Not Linen's nn.Einsum: Qwix 0.1.8's LoRA provider cannot
wrap it, SetAttributeFrozenModuleError; NNX einsums, Gemma's layout
included, go through to_lora in tests/test_lora.py.)"""

import re

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix

import lqer
from lqer.checkpoints import tree as checkpoint
from lqer.lora import training

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (2, 8, 32))
BATCHES = [(X,), (jnp.tanh(2 * X),)]
TARGET = jax.random.normal(jax.random.key(2), (2, 8, 32))
RULES = [
  lqer.LqerRule(
    module_path='.*',
    weight_qtype='int4',
    tile_size=16,
    rank=4,
    method='qera',
    solver='exact',
    factor_dtype=jnp.float32,
  )
]
LORA_RULES = lqer.lora_rules(RULES, alpha=8.0)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(64, name='up')(x))
    h = nn.DenseGeneral((2, 16), name='heads')(h)
    return nn.Dense(32, name='down')(h.reshape(*h.shape[:2], -1))


class NnxNet(nnx.Module):
  def __init__(self, *, rngs):
    self.up = nnx.Linear(32, 64, rngs=rngs)
    self.heads = nnx.LinearGeneral(64, (2, 16), rngs=rngs)
    self.down = nnx.Linear(32, 32, rngs=rngs)

  def __call__(self, x):
    h = self.heads(jnp.tanh(self.up(x)))
    return self.down(h.reshape(*h.shape[:2], -1))


FP = LinenNet().init(KEY, X)['params']


def _nnx_net():
  """NnxNet holding FP's weights."""
  model = NnxNet(rngs=nnx.Rngs(0))
  nnx.update(model, FP)
  return model


def _mse(y):
  return jnp.mean((y - TARGET) ** 2)


def _linen(tmp_path) -> dict:
  """Every stage's result, the Linen way (README's quick start)."""
  out = {}
  cal = qwix.quantize_model(LinenNet(), lqer.LqerCalibrationProvider(RULES))
  out['stats'] = stats = lqer.calibrate(cal, FP, BATCHES)
  model = qwix.quantize_model(
    LinenNet(), lqer.LqerProvider(RULES, compute_dtype=jnp.float32)
  )
  abstract = jax.eval_shape(model.init, KEY, X)['params']
  out['params'] = params = lqer.lqer_quantize_params(
    FP, abstract, calibration=stats
  )
  out['report'] = lqer.report(FP, params, stats).table()
  out['y'] = model.apply({'params': params}, X)
  out['y_packed'] = jax.jit(model.apply)(
    {'params': lqer.pack_params(params)}, X
  )
  checkpoint.save(tmp_path, params, {'run': 'linen'})
  loaded = checkpoint.load(tmp_path, abstract, {'run': 'linen'})
  out['y_loaded'] = model.apply({'params': loaded}, X)
  lora_model = qwix.apply_lora_to_model(
    LinenNet(), qwix.LoraProvider(LORA_RULES)
  )
  lora_abstract = jax.eval_shape(lora_model.init, KEY, X)['params']
  lora = lqer.to_lora(params, lora_abstract, LORA_RULES)
  out['y_lora'] = lora_model.apply({'params': lora}, X)
  adapters, frozen = training.split_adapters(lora)
  loss_fn = lambda p, x: _mse(lora_model.apply({'params': p}, x))
  optimizer = optax.adam(1e-2)
  step, opt_state = training.train_step(loss_fn, optimizer), None
  opt_state = optimizer.init(adapters)
  out['losses'] = []
  for _ in range(3):
    adapters, opt_state, loss = step(adapters, opt_state, frozen, X)
    out['losses'].append(float(loss))
  tuned = training.merge_adapters(frozen, adapters)
  out['y_tuned'] = lora_model.apply({'params': tuned}, X)
  served = lqer.from_lora(tuned, abstract, LORA_RULES)
  out['y_served'] = model.apply({'params': served}, X)
  return out


def _nnx(tmp_path) -> dict:
  """Every stage's result, the NNX way (README's NNX quick start)."""
  out = {}
  cal = qwix.quantize_model(_nnx_net(), lqer.LqerCalibrationProvider(RULES), X)
  out['stats'] = stats = lqer.calibrate(cal, None, BATCHES)
  model = qwix.quantize_model(
    _nnx_net(), lqer.LqerProvider(RULES, compute_dtype=jnp.float32), X
  )
  fp = nnx.to_pure_dict(nnx.state(_nnx_net(), nnx.Param))
  out['params'] = params = lqer.lqer_quantize_params(
    fp, model, calibration=stats
  )
  nnx.update(model, params)
  out['report'] = lqer.report(fp, model, stats).table()
  out['y'] = model(X)
  packed = lqer.pack_params(nnx.clone(model))  # in place: on a copy
  out['y_packed'] = nnx.jit(lambda m, x: m(x))(packed, X)
  checkpoint.save(tmp_path, model, {'run': 'nnx'})
  loaded = qwix.quantize_model(
    _nnx_net(), lqer.LqerProvider(RULES, compute_dtype=jnp.float32), X
  )
  assert checkpoint.load(tmp_path, loaded, {'run': 'nnx'}) is loaded
  out['y_loaded'] = loaded(X)
  lora_model = qwix.apply_lora_to_model(
    _nnx_net(), qwix.LoraProvider(LORA_RULES), X, rngs=nnx.Rngs(1)
  )
  lqer.to_lora(model, lora_model, LORA_RULES)
  out['y_lora'] = lora_model(X)
  optimizer = nnx.Optimizer(lora_model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  loss_fn = lambda m, x: _mse(m(x))
  out['losses'] = [
    float(training.nnx_train_step(lora_model, optimizer, loss_fn, X))
    for _ in range(3)
  ]
  out['y_tuned'] = lora_model(X)
  lqer.from_lora(lora_model, model, LORA_RULES)
  out['y_served'] = model(X)
  return out


@pytest.fixture(scope='module')
def both(tmp_path_factory):
  return (
    _linen(tmp_path_factory.mktemp('linen')),
    _nnx(tmp_path_factory.mktemp('nnx')),
  )


def _close(a, b, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol)


def test_calibration_statistics_agree(both):
  linen, nnx_ = both
  assert jax.tree.structure(linen['stats']) == jax.tree.structure(nnx_['stats'])
  jax.tree.map(_close, linen['stats'], nnx_['stats'])


def test_quantized_params_are_the_same_tensors(both):
  linen, nnx_ = both
  flat = lambda t: {
    jax.tree_util.keystr(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
  }
  got, want = flat(nnx_['params']), flat(linen['params'])
  # Each weight's arrays (quantized values, scales, A, B) under one path;
  # NNX's pure dict spells attributes as keys.
  strip = lambda k: '/'.join(re.findall(r'\w+', k))
  assert sorted(map(strip, got)) == sorted(map(strip, want))
  by_name = {strip(k): v for k, v in got.items()}
  for key, value in want.items():
    _close(by_name[strip(key)], value, rtol=1e-4)


def test_report_tables_agree(both):
  """The same rows (Linen lists weights in call order, NNX by name)."""
  linen, nnx_ = both
  rows = lambda table: sorted(table.splitlines())
  assert rows(nnx_['report']) == rows(linen['report'])
  assert all(f'{name}/kernel' in linen['report'] for name in ('up', 'heads'))


@pytest.mark.parametrize(
  'stage', ['y', 'y_packed', 'y_loaded', 'y_lora', 'y_tuned', 'y_served']
)
def test_outputs_agree_at_every_stage(both, stage):
  linen, nnx_ = both
  _close(nnx_[stage], linen[stage], rtol=1e-4)


def test_each_stage_keeps_the_model_it_was_given(both):
  for out in both:
    for stage in ('y_packed', 'y_loaded', 'y_lora'):
      _close(out[stage], out['y'], rtol=1e-4)
    # Training moved the adapters and lowered the loss; from_lora serves
    # the tuned model.
    assert out['losses'][-1] < out['losses'][0], out['losses']
    assert not np.allclose(out['y_tuned'], out['y'], rtol=1e-3)
    _close(out['y_served'], out['y_tuned'], rtol=1e-4)


def test_training_losses_agree(both):
  linen, nnx_ = both
  np.testing.assert_allclose(nnx_['losses'], linen['losses'], rtol=1e-4)
