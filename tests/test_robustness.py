"""No silent mistakes: every wrong input a user can hand lqer gets an error
or warning naming the param (or rule) and what would be valid."""

import warnings

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

import lqer
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.checkpoints import tree as checkpoint
from models import SimpleMLP

KEY = jax.random.key(0)
RULES = [LqerRule(weight_qtype=jnp.int4, rank=4)]


def _abstract(model, rules, x, provider=LqerProvider):
  qmodel = qwix.quantize_model(model, provider(rules))
  return qmodel, jax.eval_shape(qmodel.init, KEY, x)['params']


class TiedLM(nn.Module):
  """Embedding table read by a gather and, transposed, as the output
  projection (Embed.attend: x @ table.T)."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(32, 16)
    return embed.attend(nn.Dense(16)(embed(ids)))


def test_tied_embedding_matched_by_a_rule_is_refused_at_init():
  ids = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(
    ValueError,
    match=r'Embed_0/embedding.*tied embedding'
    r'.*exclude it',
  ):
    _abstract(TiedLM(), RULES, ids)
  # Excluding it works: only the Dense is quantized.
  rules = [LqerRule(module_path='Dense_0', weight_qtype=jnp.int4, rank=4)]
  qmodel, abstract = _abstract(TiedLM(), rules, ids)
  fp = TiedLM().init(KEY, ids)['params']
  params = lqer_quantize_params(fp, abstract)
  assert isinstance(params['Dense_0']['kernel'], lqer.WithLqer)
  assert qmodel.apply({'params': params}, ids).shape == (2, 5, 32)


def test_transposed_float_weight_is_refused_not_reshaped():
  model = nn.Dense(8, use_bias=False)
  x = jnp.ones((2, 16))
  _, abstract = _abstract(model, RULES, x)
  w = jax.random.normal(KEY, (8, 16))  # (out, in): the transpose
  with pytest.raises(
    ValueError,
    match=r'kernel: float weight of shape'
    r' \(8, 16\).*\(16, 8\).*transposed',
  ):
    lqer_quantize_params({'kernel': w}, abstract)
  with pytest.raises(
    ValueError,
    match=r'kernel: float weight of shape'
    r' \(100,\) does not fit.*\(16, 8\)',
  ):
    lqer_quantize_params({'kernel': jnp.ones(100)}, abstract)
  # A param stored flattened is reshaped, as Qwix does.
  w = jax.random.normal(KEY, (16, 8))
  flat = lqer_quantize_params({'kernel': w.reshape(-1)}, abstract)
  full = lqer_quantize_params({'kernel': w}, abstract)
  for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)


def test_plain_ptq_params_under_a_rank_rule_are_refused():
  model = SimpleMLP(dhidden=32, dout=8)
  x = jnp.ones((2, 16))
  fp = model.init(KEY, x)['params']
  _, ptq_abstract = _abstract(model, RULES, x, qwix.PtqProvider)
  ptq_params = qwix.quantize_params(fp, ptq_abstract)
  lqer_model = qwix.quantize_model(model, LqerProvider(RULES))
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel: the rule has rank 4 but'
    ' this weight is a plain Qwix PTQ weight',
  ):
    lqer_model.apply({'params': ptq_params}, x)
  # rank=None rules run them as Qwix does.
  plain = [LqerRule(weight_qtype=jnp.int4)]
  y = qwix.quantize_model(model, LqerProvider(plain, compute_dtype=None)).apply(
    {'params': ptq_params}, x
  )
  y_ptq = qwix.quantize_model(model, qwix.PtqProvider(plain)).apply(
    {'params': ptq_params}, x
  )
  np.testing.assert_array_equal(y, y_ptq)


class Outer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name='mlp')(x)


def test_rule_matching_no_weight_warns_naming_the_rule():
  """'mlp/.*' matches modules below mlp; the kernel's module is mlp."""
  x = jnp.ones((2, 16))
  fp = Outer().init(KEY, x)['params']
  rules = [LqerRule(module_path='mlp/.*', weight_qtype=jnp.int4, rank=4)]
  with pytest.warns(
    UserWarning,
    match=r'LqerProvider: rule LqerRule\('
    r"module_path='mlp/\.\*'.*matched no weight",
  ):
    _abstract(Outer(), rules, x)
  _, ptq_abstract = _abstract(Outer(), rules, x, qwix.PtqProvider)
  with pytest.warns(
    UserWarning,
    match=r"rule LqerRule\(module_path='mlp/"
    r"\.\*'.*matches no weight.*such as mlp",
  ):
    lqer_quantize_params(fp, ptq_abstract, rules)
  good = [LqerRule(module_path='mlp', weight_qtype=jnp.int4, rank=4)]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    _, abstract = _abstract(Outer(), good, x)
  assert not [w for w in caught if 'matched no weight' in str(w.message)]
  assert isinstance(abstract['mlp']['kernel'], lqer.WithLqer)


def test_nan_weight_through_nnx_init_is_refused():
  x = jnp.ones((2, 16))
  model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  model.kernel.value = model.kernel.value.at[3, 2].set(jnp.nan)
  with pytest.raises(ValueError, match='kernel: weight holds 1 NaN'):
    qwix.quantize_model(model, LqerProvider(RULES), x)


def test_errors_name_the_param_for_bad_tiles_and_1d_kernels():
  x = jnp.ones((2, 24))
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=4)]
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel: tile_size 16 does'
    r' not divide axis 0 of size 24.*\[1, 2, 3, 4, 6, 8, 12,'
    ' 24]',
  ):
    _abstract(SimpleMLP(dhidden=8, dout=4), rules, x)

  class Dot1d(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.dot(x, self.param('w', nn.initializers.ones, (24,)))

  with pytest.raises(
    ValueError,
    match=r'w: kernel of shape \(24,\) has no'
    ' output axis',
  ):
    _abstract(Dot1d(), RULES, x)


@pytest.mark.parametrize(
  'field,value',
  [
    ('power_iters', 2.5),
    ('oversample', 1.5),
    ('krylov', 'no'),
    ('qera_damping', 'x'),
    ('tile_size', {0: 'a'}),
  ],
)
def test_rule_fields_of_the_wrong_type_are_value_errors(field, value):
  with pytest.raises(ValueError, match=rf'LqerRule\(.*\)\.{field}: must'):
    LqerRule(weight_qtype=jnp.int4, rank=4, **{field: value})


def test_rule_op_names_are_honoured_or_ambiguity_is_an_error():
  model = SimpleMLP(dhidden=32, dout=8)
  x = jnp.ones((2, 16))
  fp = model.init(KEY, x)['params']
  einsum_only = LqerRule(weight_qtype=jnp.int4, rank=8, op_names=('einsum',))
  dense = LqerRule(weight_qtype=jnp.int4, rank=4)
  _, ptq_abstract = _abstract(model, [einsum_only, dense], x, qwix.PtqProvider)
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel: rule .*'
    r"op_names=\('einsum',\).*LqerProvider\(rules\)",
  ):
    lqer_quantize_params(fp, ptq_abstract, [einsum_only, dense])
  # With the provider's tree, Qwix's own matching decides: rank 4.
  _, abstract = _abstract(model, [einsum_only, dense], x)
  params = lqer_quantize_params(fp, abstract)
  assert params['Dense_0']['kernel'].rank == 4
  only_dot = LqerRule(weight_qtype=jnp.int4, rank=4, op_names=('dot_general',))
  params = lqer_quantize_params(fp, ptq_abstract, [only_dot])
  assert params['Dense_0']['kernel'].rank == 4
  # Two rules for the same ops: the first decides for every op, no doubt.
  first_dot = LqerRule(
    module_path='Dense_0',
    weight_qtype=jnp.int4,
    rank=2,
    op_names=('dot_general',),
  )
  params = lqer_quantize_params(fp, ptq_abstract, [first_dot, only_dot])
  assert params['Dense_0']['kernel'].rank == 2


def test_report_reads_packed_params_and_mxfp8():
  model = SimpleMLP(dhidden=64, dout=32)
  x = jax.random.normal(KEY, (2, 64))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=32, rank=4)]
  _, abstract = _abstract(model, rules, x)
  params = lqer_quantize_params(fp, abstract)
  packed = lqer.pack_params(params)
  assert isinstance(packed['Dense_0']['kernel'].array, lqer.PackedInt4)
  assert (
    lqer.report(fp, packed).to_dicts() == lqer.report(fp, params).to_dicts()
  )
  rules = [LqerRule(weight_qtype='mxfp8', tile_size=32, rank=4)]
  _, abstract = _abstract(model, rules, x)
  rep = lqer.report(fp, lqer_quantize_params(fp, abstract))
  # 8-bit values + one 8-bit shared exponent per 32 + the factors.
  assert all(8 < layer.bits_per_weight < 16 for layer in rep.layers)


def test_checkpoint_refuses_packed_params_and_loads_awq_bases(tmp_path):
  model = SimpleMLP(dhidden=64, dout=32)
  x = jax.random.normal(KEY, (8, 64))
  fp = model.init(KEY, x)['params']
  rules = [
    LqerRule(weight_qtype=jnp.int4, tile_size=32, rank=4, method='l2qer')
  ]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  _, new = cal.apply(
    {'params': fp, **cal.init(KEY, x)}, x, mutable='quant_stats'
  )
  qmodel, abstract = _abstract(model, rules, x)
  params = lqer_quantize_params(
    fp, abstract, calibration=new['quant_stats'], base='awq'
  )
  assert params['Dense_0']['kernel'].input_scale is not None
  with pytest.raises(
    checkpoint.CheckpointError,
    match='packed by lqer.pack_params; save the params before packing',
  ):
    checkpoint.save(tmp_path, lqer.pack_params(params), {})
  checkpoint.save(tmp_path, params, {})
  loaded = checkpoint.load(tmp_path, abstract, {})
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    qmodel.apply({'params': loaded}, x), qmodel.apply({'params': params}, x)
  )
  # base='awq' on rules without a rank: rank-0 weights that keep s.
  plain = [LqerRule(weight_qtype=jnp.int4, tile_size=32)]
  qmodel, abstract = _abstract(model, plain, x)
  params = lqer_quantize_params(
    fp, abstract, calibration=new['quant_stats'], base='awq'
  )
  assert params['Dense_0']['kernel'].rank == 0
  checkpoint.save(tmp_path / 'plain', params, {})
  loaded = checkpoint.load(tmp_path / 'plain', abstract, {})
  np.testing.assert_array_equal(
    qmodel.apply({'params': loaded}, x), qmodel.apply({'params': params}, x)
  )


def test_rank_none_default_provider_is_qwix_at_many_tokens():
  """'auto' would pick bf16 at >= 64 rows; plain Qwix weights keep f32."""
  model = SimpleMLP(dhidden=64, dout=32)
  x = jax.random.normal(KEY, (128, 16))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16)]
  ptq_model, ptq_abstract = _abstract(model, rules, x, qwix.PtqProvider)
  lqer_model, abstract = _abstract(model, rules, x)
  params = lqer_quantize_params(fp, abstract)
  y = jax.jit(lqer_model.apply)({'params': params}, x)
  y_qwix = jax.jit(ptq_model.apply)(
    {'params': qwix.quantize_params(fp, ptq_abstract)}, x
  )
  np.testing.assert_array_equal(y, y_qwix)
