"""QLoRA from the reconstruction: lqer.to_lora / from_lora and training the
adapters with optax, Linen and NNX."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix

import lqer
from lqer.cli import finetune
from lqer.lora import training
from models import NnxTransformer
from models import SimpleMLP
from models import Transformer
from models import smollm2

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (2, 8, 16))


def _rules(rank=4, method='svd', **kw):
  return [
    lqer.LqerRule(
      module_path='.*',
      weight_qtype='int4',
      tile_size=16,
      rank=rank,
      method=method,
      solver='exact',
      **kw,
    )
  ]


def _rel(y, ref):
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def _linen(model, rules, x=X, alpha=8.0):
  """(LQER model, params, abstract, LoRA model, LoRA params, LoRA rules)."""
  fp = model.init(KEY, x)['params']
  lqer_model = qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=jnp.float32)
  )
  abstract = jax.eval_shape(lqer_model.init, KEY, x)['params']
  params = lqer.lqer_quantize_params(fp, abstract)
  lrules = lqer.lora_rules(rules, alpha)
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider(lrules))
  lora_abstract = jax.eval_shape(lora_model.init, KEY, x)['params']
  lora_params = lqer.to_lora(params, lora_abstract, lrules)
  return lqer_model, params, abstract, lora_model, lora_params, lrules


class GemmaAttention(nnx.Module):
  """Gemma's einsum layouts: q contracts D on the kernel's middle axis
  ('BTD,NDH->BTNH'), the output projection contracts (N, H)."""

  def __init__(self, *, rngs):
    self.q = nnx.Einsum('BTD,NDH->BTNH', (2, 16, 16), rngs=rngs)
    self.o = nnx.Einsum('BTNH,NHD->BTD', (2, 16, 16), rngs=rngs)

  def __call__(self, x):
    return self.o(jnp.tanh(self.q(x)))


def _nnx(model, rules, x=X, alpha=8.0):
  """(LQER model, LoRA model, LoRA rules), the LoRA model converted."""
  fp = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lqer_model = nnx.eval_shape(
    lambda: qwix.quantize_model(
      model, lqer.LqerProvider(rules, compute_dtype=jnp.float32), x
    )
  )
  nnx.update(lqer_model, lqer.lqer_quantize_params(fp, lqer_model))
  lrules = lqer.lora_rules(rules, alpha)
  lora_model = qwix.apply_lora_to_model(
    model, qwix.LoraProvider(lrules), x, rngs=nnx.Rngs(1)
  )
  lqer.to_lora(lqer_model, lora_model, lrules)
  return lqer_model, lora_model, lrules


@pytest.mark.parametrize(
  'model',
  [SimpleMLP(dhidden=32, dout=16), Transformer()],
  ids=['dense', 'dense_general_multi_axis'],
)
def test_linen_step0_output_equals_lqer_and_round_trip_is_bit_exact(model):
  x = X if isinstance(model, Transformer) else X[0]
  lqer_model, params, abstract, lora_model, lora_params, lrules = _linen(
    model, _rules(), x
  )
  y = lqer_model.apply({'params': params}, x)
  y_lora = lora_model.apply({'params': lora_params}, x)
  assert _rel(y_lora, y) < 1e-5
  # Without the adapters' contribution the outputs differ: they are used.
  adapters, frozen = training.split_adapters(lora_params)
  zeroed = training.merge_adapters(
    frozen, jax.tree.map(jnp.zeros_like, adapters)
  )
  assert _rel(lora_model.apply({'params': zeroed}, x), y) > 1e-3
  # Base as lqer stored it; a = A; b = B * rank / alpha.
  for path in (
    [('Dense_0',)]
    if not isinstance(model, Transformer)
    else [('block_0', 'fc1'), ('block_0', 'out'), ('block_1', 'query')]
  ):
    got = lora_params
    want = params
    for k in path:
      got, want = got[k], want[k]
    np.testing.assert_array_equal(
      got['kernel'].array.qvalue, want['kernel'].array.qvalue
    )
    w = want['kernel']
    np.testing.assert_array_equal(
      got['kernel_lora_a'],
      np.asarray(w.a, np.float32).reshape(got['kernel_lora_a'].shape),
    )
    np.testing.assert_allclose(
      got['kernel_lora_b'],
      np.asarray(w.b, np.float32).reshape(got['kernel_lora_b'].shape) * 4 / 8.0,
      rtol=1e-7,
    )
  back = lqer.from_lora(lora_params, abstract, lrules)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_float32_factors_round_trip_bit_exact_with_power_of_two_scale():
  model = SimpleMLP(dhidden=32, dout=16)
  rules = _rules(factor_dtype=jnp.float32)
  _, params, abstract, _, lora_params, lrules = _linen(
    model, rules, X[0], alpha=16.0
  )
  back = lqer.from_lora(lora_params, abstract, lrules)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  'make',
  [
    lambda: NnxTransformer(rngs=nnx.Rngs(0)),
    lambda: GemmaAttention(rngs=nnx.Rngs(0)),
  ],
  ids=['einsum_and_linear', 'gemma_einsum'],
)
def test_nnx_step0_equality_and_round_trip(make):
  lqer_model, lora_model, lrules = _nnx(make(), _rules())
  y = lqer_model(X)
  assert _rel(lora_model(X), y) < 1e-5
  assert nnx.state(lora_model, nnx.LoRAParam)  # adapters exist
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lqer_model)))
  lqer.from_lora(lora_model, lqer_model, lrules)
  after = nnx.to_pure_dict(nnx.state(lqer_model))
  for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  'factor_dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-3)]
)
def test_from_lora_serves_tuned_adapters_on_the_packed_fast_path(
  factor_dtype, tol
):
  # float32 factors keep the tuned adapters exactly; bf16 rounds them.
  model = SimpleMLP(dhidden=64, dout=32)
  x = jax.random.normal(KEY, (4, 32))
  lqer_model, _, abstract, lora_model, lora_params, lrules = _linen(
    model, _rules(rank=8, factor_dtype=factor_dtype), x
  )
  adapters, frozen = training.split_adapters(lora_params)
  tuned = training.merge_adapters(
    frozen,
    jax.tree.map(
      lambda a: a + 0.01 * jax.random.normal(KEY, a.shape), adapters
    ),
  )
  y_lora = lora_model.apply({'params': tuned}, x)
  served = lqer.from_lora(tuned, abstract, lrules)
  packed = lqer.pack_params(served)
  assert isinstance(packed['Dense_0']['kernel'].array, lqer.PackedInt4)
  assert _rel(lqer_model.apply({'params': served}, x), y_lora) < tol
  assert _rel(jax.jit(lqer_model.apply)({'params': packed}, x), y_lora) < tol


def test_linen_optax_step_updates_only_adapters_and_lowers_loss():
  x = X
  target = jax.random.normal(jax.random.key(3), (2, 8, 32))
  _, _, _, lora_model, lora_params, _ = _linen(Transformer(), _rules(), x)
  adapters, frozen = training.split_adapters(lora_params)
  assert adapters and all(
    str(p[-1]).endswith(('_lora_a', '_lora_b'))
    for p in jax.tree_util.tree_flatten_with_path(adapters)[0]
    for p in [[k.key for k in p[0]]]
  )
  loss_fn = lambda p, b: jnp.mean(
    (lora_model.apply({'params': p}, b[0]) - b[1]) ** 2
  )
  # Gradients reach only the adapters: the base is not an argument of grad.
  grads = jax.grad(
    lambda a: loss_fn(training.merge_adapters(frozen, a), (x, target))
  )(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  frozen_before = jax.tree.map(np.asarray, frozen)
  adapters_before = jax.tree.map(np.asarray, adapters)
  optimizer = optax.adamw(1e-2)
  step = training.train_step(loss_fn, optimizer)
  opt_state = optimizer.init(adapters)
  losses = []
  for _ in range(5):
    adapters, opt_state, loss = step(adapters, opt_state, frozen, (x, target))
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(got, want)
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(adapters_before))
  ]
  assert all(changed)
  base = frozen['block_0']['fc1']['kernel']
  assert base.array.qvalue.dtype == jnp.int4  # still quantized


def test_nnx_optax_step_updates_only_lora_params():
  _, lora_model, _ = _nnx(NnxTransformer(rngs=nnx.Rngs(0)), _rules())
  target = jnp.zeros_like(lora_model(X))
  optimizer = nnx.Optimizer(lora_model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
  base_before = jax.tree.map(
    np.asarray, nnx.to_pure_dict(nnx.state(lora_model, nnx.Not(nnx.LoRAParam)))
  )
  lora_before = jax.tree.map(
    np.asarray, nnx.to_pure_dict(nnx.state(lora_model, nnx.LoRAParam))
  )
  losses = [
    float(training.nnx_train_step(lora_model, optimizer, loss_fn, (X, target)))
    for _ in range(5)
  ]
  assert losses[-1] < 0.8 * losses[0]
  base_after = nnx.to_pure_dict(nnx.state(lora_model, nnx.Not(nnx.LoRAParam)))
  for got, want in zip(
    jax.tree.leaves(base_after), jax.tree.leaves(base_before)
  ):
    np.testing.assert_array_equal(got, want)
  lora_after = nnx.to_pure_dict(nnx.state(lora_model, nnx.LoRAParam))
  assert all(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(lora_after), jax.tree.leaves(lora_before))
  )


def test_errors_name_the_param():
  model = SimpleMLP(dhidden=32, dout=16)
  x = X[0]
  _, params, abstract, lora_model, lora_params, lrules = _linen(
    model, _rules(), x
  )
  lora_abstract = jax.eval_shape(lora_model.init, KEY, x)['params']
  # Plain PTQ params (no factors) under LoRA rules.
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(_rules()))
  ptq = qwix.quantize_params(
    model.init(KEY, x)['params'],
    jax.eval_shape(ptq_model.init, KEY, x)['params'],
  )
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel gets a LoRA adapter'
    r' but has no LQER factors',
  ):
    lqer.to_lora(ptq, lora_abstract, lrules)
  # Rules of another rank.
  other = lqer.lora_rules(_rules(rank=8), 8.0)
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel: the LQER factors'
    r' have rank 4 but the LoRA rule.*rank 8',
  ):
    lqer.to_lora(params, lora_abstract, other)
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel: the LQER factors'
    r' have rank 4 but the LoRA rule.*rank 8',
  ):
    lqer.from_lora(lora_params, abstract, other)
  # LoRA rules that leave a reconstructed weight out.
  partial = lqer.lora_rules(
    [
      lqer.LqerRule(
        module_path='Dense_1', weight_qtype='int4', tile_size=16, rank=4
      )
    ],
    8.0,
  )
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel has LQER factors of'
    r' rank 4 but no LoraRule matches it',
  ):
    lqer.to_lora(params, lora_abstract, partial)
  # Packed params.
  with pytest.raises(ValueError, match=r'Dense_0/kernel: packed params'):
    lqer.to_lora(lqer.pack_params(params), lora_abstract, lrules)


def test_awq_base_is_refused_with_the_reason():
  model = SimpleMLP(dhidden=32, dout=16)
  x = jax.random.normal(KEY, (64, 16))
  rules = _rules()
  fp = model.init(KEY, x)['params']
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  stats = cal.apply(
    {'params': fp, **cal.init(KEY, x)}, x, mutable='quant_stats'
  )[1]['quant_stats']
  lqer_model = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = jax.eval_shape(lqer_model.init, KEY, x)['params']
  params = lqer.lqer_quantize_params(
    fp, abstract, calibration=stats, base='awq'
  )
  lrules = lqer.lora_rules(rules, 8.0)
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider(lrules))
  with pytest.raises(ValueError, match=r'Dense_0/kernel: its base carries'):
    lqer.to_lora(
      params, jax.eval_shape(lora_model.init, KEY, x)['params'], lrules
    )


def test_lora_rules_keep_qwix_settings_and_skip_rank_none():
  rules = [
    lqer.LqerRule(module_path='a', weight_qtype='int4', tile_size=32, rank=8),
    lqer.LqerRule(module_path='b', weight_qtype='int8'),
  ]
  lora, plain = lqer.lora_rules(rules, 16.0, dropout=0.1)
  assert isinstance(lora, qwix.LoraRule)
  assert (
    lora.module_path,
    lora.weight_qtype,
    lora.tile_size,
    lora.rank,
    lora.alpha,
    lora.dropout,
  ) == ('a', 'int4', 32, 8, 16.0, 0.1)
  assert type(plain) is qwix.QuantizationRule
  assert plain.weight_qtype == 'int8'


def _tiny_llama():
  return smollm2.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=10000.0,
    rms_eps=1e-5,
    max_seq_len=64,
  )


def test_scanned_smollm2_equals_the_unrolled_model():
  cfg = _tiny_llama()
  model = smollm2.SmolLM2(cfg)
  ids = jax.random.randint(KEY, (2, 16), 0, 64)
  params = model.init(KEY, ids)['params']
  stacked = smollm2.stack_layers(params, cfg.num_layers)
  assert stacked['layers']['attn']['q_proj']['kernel'].shape == (3, 32, 32)
  hidden = smollm2.scanned_hidden(
    smollm2.SingleBlock(cfg).apply, cfg, stacked, ids
  )
  np.testing.assert_allclose(
    smollm2.output_logits(params, hidden),
    model.apply({'params': params}, ids),
    rtol=1e-5,
    atol=1e-5,
  )
  back = smollm2.unstack_layers(stacked, cfg.num_layers)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_chunked_next_token_loss_matches_full_log_softmax():
  hidden = jax.random.normal(KEY, (2, 20, 8))
  proj = jax.random.normal(jax.random.key(1), (8, 50))
  windows = jax.random.randint(KEY, (2, 20), 0, 50)
  logits = hidden @ proj
  want = -jnp.mean(
    jnp.take_along_axis(
      jax.nn.log_softmax(logits[:, :-1]), windows[:, 1:, None], axis=-1
    )
  )
  got = finetune.next_token_loss(hidden, lambda h: h @ proj, windows, chunk=8)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mixed_rules_plain_ptq_weights_pass_through_both_ways():
  rules = [
    lqer.LqerRule(module_path='Dense_1', weight_qtype='int4', tile_size=16)
  ] + _rules()  # Dense_1: plain PTQ
  _, params, abstract, lora_model, lora_params, lrules = _linen(
    SimpleMLP(dhidden=32, dout=16), rules, X[0]
  )
  assert 'kernel_lora_a' not in lora_params['Dense_1']
  assert 'kernel_lora_a' in lora_params['Dense_0']
  back = lqer.from_lora(lora_params, abstract, lrules)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_einsum_batch_axes_are_refused_naming_the_param():
  model = nnx.Einsum('btd,tdf->btf', (8, 16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r'kernel: LoRA adapters of shapes'
    r'.*shares lora_b across einsum batch axes',
  ):
    _nnx(model, _rules())
