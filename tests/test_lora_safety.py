"""QLoRA safety, as a user meets it: training never destroys the params it
started from, a NaN step changes nothing and says which step, non-finite
factors never reach a served model, bad alpha / rank / CLI flags are refused
up front; and QERA-init beats zero-init after the same training."""

import math
import types

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix

import lqer
from lqer.cli import finetune
from lqer.cli import main as cli
from lqer.cli import tasks
from lqer.lora import training
from models import NnxMLP
from models import SimpleMLP
from tests.test_lora import KEY
from tests.test_lora import X
from tests.test_lora import _linen
from tests.test_lora import _nnx
from tests.test_lora import _rules

NAN = float('nan')


def _mse_to(target):
  """The loss of a LoRA Linen model against `target` on batch (x, scale):
  `scale` NaN makes that step's loss NaN."""
  return lambda apply: (
    lambda p, b: b[1] * jnp.mean((apply({'params': p}, b[0]) - target) ** 2)
  )


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


def _mlp_linen(factor_dtype=jnp.bfloat16):
  x = X[0]
  return x, _linen(
    SimpleMLP(dhidden=32, dout=16), _rules(factor_dtype=factor_dtype), x
  )


@pytest.mark.parametrize('factor_dtype', [jnp.float32, jnp.bfloat16])
def test_lqer_params_stay_usable_after_training_their_adapters(factor_dtype):
  # float32 factors into float32 adapters: a = A is a no-op cast, which
  # used to hand the LQER params' buffer to the adapters (and a donating
  # step then deleted it).
  x, (lqer_model, params, abstract, lora_model, lora_params, lrules) = (
    _mlp_linen(factor_dtype)
  )
  y = np.asarray(lqer_model.apply({'params': params}, x))
  params_before = _numpy(params)
  adapters, frozen = training.split_adapters(lora_params)
  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(adapters)
  step = training.train_step(
    _mse_to(jnp.zeros_like(y))(lora_model.apply), optimizer
  )
  first, first_values = adapters, _numpy(adapters)
  for _ in range(4):
    adapters, opt_state, _ = step(adapters, opt_state, frozen, (x, 1.0))
  _assert_trees_equal(params, params_before)
  np.testing.assert_array_equal(lqer_model.apply({'params': params}, x), y)
  # The step donates nothing: the adapters it started from are intact too.
  _assert_trees_equal(first, first_values)
  # Deleting every adapter buffer (what a user's own donating step does)
  # leaves the LQER params, and the params from_lora made, usable.
  tuned = lqer.from_lora(
    training.merge_adapters(frozen, adapters), abstract, lrules
  )
  y_tuned = np.asarray(lqer_model.apply({'params': tuned}, x))
  for leaf in jax.tree.leaves(first) + jax.tree.leaves(adapters):
    leaf.delete()
  np.testing.assert_array_equal(lqer_model.apply({'params': params}, x), y)
  np.testing.assert_array_equal(lqer_model.apply({'params': tuned}, x), y_tuned)


def test_nnx_lqer_model_stays_usable_after_training_its_adapters():
  lqer_model, lora_model, lrules = _nnx(
    NnxMLP(16, 32, 16, rngs=nnx.Rngs(0)), _rules(factor_dtype=jnp.float32)
  )
  y = np.asarray(lqer_model(X))
  adapters = lambda: jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam))
  first = adapters()  # to_lora's
  optimizer = nnx.Optimizer(lora_model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
  for _ in range(3):
    training.nnx_train_step(lora_model, optimizer, loss_fn, X)
  for leaf in first + adapters():  # as a donating step would
    leaf.delete()
  np.testing.assert_array_equal(lqer_model(X), y)


def test_nan_loss_at_step_k_keeps_the_adapters_and_optimizer_state():
  x, (_, _, _, lora_model, lora_params, _) = _mlp_linen()
  adapters, frozen = training.split_adapters(lora_params)
  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(adapters)
  step = training.train_step(_mse_to(0.0)(lora_model.apply), optimizer)
  scales = [1.0, 1.0, NAN, 1.0]  # step 3's loss is NaN
  for scale in scales[:2]:
    adapters, opt_state, _ = step(adapters, opt_state, frozen, (x, scale))
  kept = _numpy((adapters, opt_state))
  with pytest.raises(FloatingPointError, match=r'step 3: its loss is nan'):
    step(adapters, opt_state, frozen, (x, scales[2]))
  # Nothing was applied or deleted; training goes on from step 2's values.
  _assert_trees_equal((adapters, opt_state), kept)
  adapters, opt_state, loss = step(adapters, opt_state, frozen, (x, 1.0))
  assert math.isfinite(float(loss))
  assert int(opt_state[0].count) == 3  # steps applied: 1, 2 and 4


def test_non_finite_update_with_a_finite_loss_is_refused():
  x, (_, _, _, lora_model, lora_params, _) = _mlp_linen()
  adapters, frozen = training.split_adapters(lora_params)
  optimizer = optax.sgd(float('inf'))
  step = training.train_step(_mse_to(0.0)(lora_model.apply), optimizer)
  kept = _numpy(adapters)
  with pytest.raises(FloatingPointError, match=r'step 1: its update is not'):
    step(adapters, optimizer.init(adapters), frozen, (x, 1.0))
  _assert_trees_equal(adapters, kept)


def test_nnx_nan_loss_at_step_k_keeps_the_model_and_optimizer():
  _, lora_model, _ = _nnx(NnxMLP(16, 32, 16, rngs=nnx.Rngs(0)), _rules())
  optimizer = nnx.Optimizer(lora_model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  loss_fn = lambda m, b: b[1] * jnp.mean(m(b[0]) ** 2)
  for _ in range(2):
    training.nnx_train_step(lora_model, optimizer, loss_fn, (X, 1.0))
  kept = _numpy(nnx.to_pure_dict(nnx.state((lora_model, optimizer))))
  with pytest.raises(FloatingPointError, match=r'step 3: its loss is nan'):
    training.nnx_train_step(lora_model, optimizer, loss_fn, (X, NAN))
  _assert_trees_equal(
    nnx.to_pure_dict(nnx.state((lora_model, optimizer))), kept
  )
  assert int(optimizer.step[...]) == 2
  loss = training.nnx_train_step(lora_model, optimizer, loss_fn, (X, 1.0))
  assert math.isfinite(float(loss)) and int(optimizer.step[...]) == 3


def _with_nan(tree, key):
  """`tree` with the first element of the leaf at path `key` set to NaN."""
  return jax.tree_util.tree_map_with_path(
    lambda p, v: (
      v.reshape(-1).at[0].set(NAN).reshape(v.shape)
      if jax.tree_util.keystr(p, simple=True, separator='/') == key
      else v
    ),
    tree,
  )


def test_from_lora_and_pack_params_refuse_nan_factors_naming_the_param():
  x, (_, params, abstract, _, lora_params, lrules) = _mlp_linen()
  bad_lora = _with_nan(lora_params, 'Dense_1/kernel_lora_b')
  with pytest.raises(
    ValueError,
    match=r'from_lora: Dense_1/kernel: its adapter Dense_1/kernel_lora_b'
    r' gives 1 non-finite',
  ):
    lqer.from_lora(bad_lora, abstract, lrules)
  bad = jax.tree.map(
    lambda w: (
      w.replace(a=w.a.at[0, 0].set(jnp.inf))
      if isinstance(w, lqer.WithLqer)
      else w
    ),
    params,
    is_leaf=lambda w: isinstance(w, lqer.WithLqer),
  )
  with pytest.raises(
    ValueError, match=r'pack_params: Dense_0/kernel: its LQER factor a'
  ):
    lqer.pack_params(bad)
  lqer.pack_params(params)  # finite: packs


def test_nnx_from_lora_and_pack_params_refuse_nan_factors():
  lqer_model, lora_model, lrules = _nnx(
    NnxMLP(16, 32, 16, rngs=nnx.Rngs(0)), _rules()
  )
  lora_model.fc2.kernel_lora_a[...] = (
    lora_model.fc2.kernel_lora_a[...].at[0, 0].set(NAN)
  )
  with pytest.raises(
    ValueError, match=r'from_lora: fc2/kernel: its adapter fc2/kernel_lora_a'
  ):
    lqer.from_lora(lora_model, lqer_model, lrules)
  lqer_model.fc1.kernel.b[...] = lqer_model.fc1.kernel.b[...].at[0, 0].set(NAN)
  with pytest.raises(
    ValueError, match=r'pack_params: fc1/kernel: its LQER factor b'
  ):
    lqer.pack_params(lqer_model)


def test_from_lora_refuses_a_target_with_quantized_factors():
  # It used to cast the tuned adapters to int8 with unit scales.
  _, _, abstract, _, lora_params, lrules = _linen(
    SimpleMLP(dhidden=32, dout=16), _rules(factor_qtype='int8'), X[0]
  )
  with pytest.raises(
    ValueError, match=r"Dense_0/kernel: .*factor_qtype='int8'"
  ):
    lqer.from_lora(lora_params, abstract, lrules)


@pytest.mark.parametrize(
  'alpha,error',
  [
    (0, ValueError),
    (-8.0, ValueError),
    (NAN, ValueError),
    (float('inf'), ValueError),
    ('16', TypeError),
    (None, TypeError),
    (True, TypeError),
  ],
)
def test_lora_rules_refuse_a_bad_alpha(alpha, error):
  with pytest.raises(error, match=r'lora_rules: alpha must be'):
    lqer.lora_rules(_rules(), alpha)


def test_lora_rules_take_numpy_numbers_and_refuse_auto_rank():
  (rule,) = lqer.lora_rules(_rules(rank=np.int64(4)), np.float32(8.0))
  assert (rule.rank, rule.alpha) == (4, 8.0)
  assert type(rule.alpha) is float and type(rule.rank) is int
  auto = [
    lqer.LqerRule(
      module_path='.*', weight_qtype='int4', tile_size=16, rank='auto'
    )
  ]
  with pytest.raises(ValueError, match=r"\.rank: 'auto' gives each weight"):
    lqer.lora_rules(auto, 8.0)


@pytest.mark.parametrize(
  'flag,value',
  [
    ('--lr', 'nan'),
    ('--lr', '0'),
    ('--lr', '-1e-3'),
    ('--lr', 'inf'),
    ('--alpha', '0'),
    ('--alpha', 'nan'),
    ('--rank', '0'),
    ('--steps', '0'),
    ('--batch-tokens', '-512'),
  ],
)
def test_finetune_flags_are_refused_before_a_model_loads(
  flag, value, monkeypatch
):
  def no_model(*args, **kwargs):
    raise AssertionError('a model was loaded before the flags were checked')

  monkeypatch.setitem(tasks.TASKS, 'smollm2', no_model)
  with pytest.raises(SystemExit, match=rf'^lqer finetune: {flag} must be'):
    cli.main(['finetune', f'{flag}={value}', '--init', 'qera'])


def test_finetune_nan_step_exits_naming_the_init_step_and_lr(monkeypatch):
  def rows(*args, **kwargs):
    yield finetune.FinetuneRow('QERA', 0, 'perplexity', 20.0)
    # What finetune_rows raises when train_step refuses a step.
    raise FloatingPointError(
      'lqer finetune --init qera: lqer train_step: step 2: its loss is nan.'
    )

  monkeypatch.setitem(
    tasks.TASKS, 'smollm2', lambda *a, **k: types.SimpleNamespace(train_data=[])
  )
  monkeypatch.setattr(finetune, 'finetune_rows', rows)
  with pytest.raises(
    SystemExit, match=r'--init qera: .*step 2: .*\(--lr 0\.5, --alpha 32\)'
  ):
    cli.main(['finetune', '--lr', '0.5', '--init', 'qera'])


def test_qera_init_beats_zero_init_after_the_same_steps():
  """One int4 Dense layer whose inputs span K dimensions, rank-K adapters,
  the loss its output's mean squared error to the float layer's, on the
  calibration batch, full-batch SGD.

  The math: with R = X^T X / N, the loss of a residual D = W - deq(Wq) - A B
  is f(D) = tr(D^T R D) / out. QERA minimises g(D) = f(D) + l ||D||_F^2 /
  out over rank K, l = damping * mean(diag R). The inputs span K
  dimensions, so some rank-K A B, P E with P the projector onto them
  (E = W - deq(Wq)), has f = 0; hence f(QERA) <= g(QERA) <= g(P E) =
  l ||(I - P) E||_F^2 / out =: bound. Gradient descent from there with a
  step below 2 / smoothness does not raise f. Zero-init (Qwix's: b = 0)
  starts at the PTQ loss f(E), and the same steps must not bring it below
  the bound for QERA to win; they do lower it (the comparison is not
  against an untrained model).
  """
  k, d, steps = 4, 32, 8
  model = nn.Dense(d, use_bias=False)
  m = jax.random.normal(jax.random.key(1), (k, d))
  x = jax.random.normal(jax.random.key(2), (64, k)) @ m
  fp = model.init(KEY, x)['params']
  rules = _rules(rank=k, method='qera', factor_dtype=jnp.float32)
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  stats = cal.apply(
    {'params': fp, **cal.init(KEY, x)}, x, mutable='quant_stats'
  )[1]['quant_stats']
  lqer_model = qwix.quantize_model(model, lqer.LqerProvider(rules))
  params = lqer.lqer_quantize_params(
    fp,
    jax.eval_shape(lqer_model.init, KEY, x)['params'],
    calibration=stats,
  )
  lrules = lqer.lora_rules(rules, float(k))
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider(lrules))
  qera = lqer.to_lora(
    params, jax.eval_shape(lora_model.init, KEY, x)['params'], lrules
  )
  # Qwix's own adapter init on the same base, as `lqer finetune --init zero`.
  zero = training.merge_adapters(
    qera, training.split_adapters(lora_model.init(KEY, x)['params'])[0]
  )
  y_fp = model.apply({'params': fp}, x)
  loss_fn = lambda p, batch: jnp.mean(
    (lora_model.apply({'params': p}, batch) - y_fp) ** 2
  )

  def train(lora_params):
    adapters, frozen = training.split_adapters(lora_params)
    optimizer = optax.sgd(0.2)
    opt_state = optimizer.init(adapters)
    step = training.train_step(loss_fn, optimizer)
    for _ in range(steps):
      adapters, opt_state, _ = step(adapters, opt_state, frozen, x)
    return float(loss_fn(training.merge_adapters(frozen, adapters), x))

  base = params['kernel']
  e = fp['kernel'] - qwix.dequantize(base.array).astype(jnp.float32)
  r = x.T @ x / x.shape[0]
  q, _ = jnp.linalg.qr(m.T)  # (d, k): an orthonormal basis of the inputs
  damping = rules[0].qera_damping * jnp.mean(jnp.diag(r))
  bound = float(damping * jnp.sum((e - q @ (q.T @ e)) ** 2) / d)
  ptq = float(jnp.trace(e.T @ r @ e) / d)
  assert float(loss_fn(zero, x)) == pytest.approx(ptq, rel=1e-4)
  assert float(loss_fn(qera, x)) <= bound
  qera_loss, zero_loss = train(qera), train(zero)
  assert qera_loss <= bound < zero_loss
  assert zero_loss < 0.8 * ptq  # zero-init did learn
