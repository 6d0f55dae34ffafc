"""Packed int4 weights (lqer.pack_params) and the per-shape compute dtype."""

import dataclasses

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from qwix._src.core import qarray

import lqer
from lqer import LqerProvider, LqerRule, lqer_quantize_params, matmul, packing
from models import NnxMLP, Transformer

KEY = jax.random.key(0)


def _int4_qarray(rng, shape, groups):
  """Random int4 QArray with a per-group scale along axis 0 (and NumPy)."""
  q = rng.integers(-8, 8, size=shape).astype(np.int8)
  scale = rng.uniform(0.5, 2.0, size=(groups, *shape[1:])).astype(np.float32)
  arr = qarray.QArray(qvalue=jnp.asarray(q).astype(jnp.int4),
                      scale=jnp.asarray(scale))
  w = (q.reshape(groups, -1, *shape[1:]) * scale[:, None]).reshape(shape)
  return arr, w.astype(np.float32)


# (1408, 64) / 11 groups: six row blocks on the one-token path, the last
# one short; (2048, 8) / 1 group: row blocks inside one scale group.
@pytest.mark.parametrize('shape,groups', [((256, 96), 2), ((64, 3, 8), 1),
                                          ((128, 130), 4), ((1408, 64), 11),
                                          ((2048, 8), 1)])
@pytest.mark.parametrize('tokens', [1, 5, 40, 70])  # 40: 16-row dot slices
def test_packed_matmul_matches_numpy(shape, groups, tokens):
  rng = np.random.default_rng(tokens)
  arr, w = _int4_qarray(rng, shape, groups)
  layout = lqer.layout.KernelLayout(shape, (0,), ())
  assert packing.unpackable_reason(arr, layout) is None
  p = packing.pack(arr)
  assert p.packed.dtype == jnp.uint8
  assert p.packed.size * 2 == arr.qvalue.size  # same bytes as packed int4
  x = rng.normal(size=(tokens, shape[0])).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  ref = np.tensordot(x.astype(np.float64), w, axes=([1], [0]))
  y = jax.jit(lambda x, p: packing.packed_dot_general(
      x, p, dims, jnp.float32))(x, p)
  # float32 sums: 1e-4 up to 256 contracted rows, growing with the rows.
  np.testing.assert_allclose(y, ref, rtol=1e-5,
                             atol=1e-4 * max(1, shape[0] / 256))
  y16 = packing.packed_dot_general(x, p, dims, jnp.bfloat16)
  assert float(np.linalg.norm(y16 - ref) / np.linalg.norm(ref)) < 1e-2


def test_packed_bytes_follow_the_documented_layout():
  """p[i, j] = (q[i, j] & 15) | (q[i, j + out/2] & 15) << 4, in NumPy."""
  rng = np.random.default_rng(2)
  arr, _ = _int4_qarray(rng, (8, 12), 1)
  q = np.asarray(arr.qvalue.astype(jnp.int8)).astype(np.int64)
  want = (q[:, :6] & 15) | ((q[:, 6:] & 15) << 4)
  np.testing.assert_array_equal(np.asarray(packing.pack(arr).packed), want)


def test_packed_matmul_two_contracting_axes():
  """An attention output kernel (heads, head_dim, d), tiled along heads."""
  rng = np.random.default_rng(1)
  arr, w = _int4_qarray(rng, (4, 8, 6), 2)  # scale (2, 8, 6): not contiguous
  layout = lqer.layout.KernelLayout((4, 8, 6), (0, 1), ())
  assert 'contiguous' in packing.unpackable_reason(arr, layout)
  arr = arr.replace(scale=arr.scale[:, :1])  # scale (2, 1, 6): groups of rows
  w = (np.asarray(arr.qvalue.astype(jnp.float32)).reshape(2, 2, 8, 6)
       * np.asarray(arr.scale)[:, None]).reshape(4, 8, 6)
  assert packing.unpackable_reason(arr, layout) is None
  p = packing.pack(arr, 2)
  x = rng.normal(size=(3, 8, 4)).astype(np.float32)  # contract axes 2, 1
  dims = (((2, 1), (0, 1)), ((), ()))
  y = packing.packed_dot_general(x, p, dims, jnp.float32)
  np.testing.assert_allclose(y, np.einsum('bjh,hjo->bo', x, w), rtol=1e-5,
                             atol=1e-4)


def test_unpackable_weights_are_named_and_left_alone():
  rng = np.random.default_rng(0)
  arr, _ = _int4_qarray(rng, (16, 9), 1)
  assert 'odd output' in packing.unpackable_reason(
      arr, lqer.layout.KernelLayout((16, 9), (0,), ()))
  arr, _ = _int4_qarray(rng, (4, 16, 8), 1)
  assert 'leading axes' in packing.unpackable_reason(
      arr, lqer.layout.KernelLayout((4, 16, 8), (1,), (0,)))
  int8 = qarray.QArray(qvalue=jnp.zeros((16, 8), jnp.int8),
                       scale=jnp.ones((1, 8)))
  assert 'int4' in packing.unpackable_reason(
      int8, lqer.layout.KernelLayout((16, 8), (0,), ()))


@pytest.mark.parametrize('compute_dtype', [jnp.float32, 'auto'])
def test_pack_params_linen_same_output(compute_dtype):
  """Packing changes the storage, not the numbers (Dense + DenseGeneral)."""
  model = Transformer()
  x = jax.random.normal(KEY, (2, 40, 16))  # 80 tokens: 'auto' picks bf16
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=8)]
  qmodel = qwix.quantize_model(model, LqerProvider(rules,
                                                   compute_dtype=compute_dtype))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  params = lqer_quantize_params(fp, abstract)
  packed = lqer.pack_params(params)
  kinds = {type(w.array).__name__ for w in jax.tree.leaves(
      packed, is_leaf=lambda v: isinstance(v, lqer.WithLqer))
           if isinstance(w, lqer.WithLqer)}
  assert kinds == {'PackedInt4'}  # incl. DenseGeneral out (2 contracting)
  f32 = qwix.quantize_model(model, LqerProvider(rules,
                                                compute_dtype=jnp.float32))
  for xx in (x, x[:1, :1]):
    ref = jax.jit(qmodel.apply)({'params': params}, xx)
    y = jax.jit(qmodel.apply)({'params': packed}, xx)
    if compute_dtype == jnp.float32:
      # Same dequantized values; the branch is added per block (f32 rounding).
      np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    else:  # bf16 dots at 80 rows: both within bf16 rounding of float32
      exact = jax.jit(f32.apply)({'params': params}, xx)
      for out in (y, ref):
        assert float(jnp.linalg.norm(out - exact)
                     / jnp.linalg.norm(exact)) < 1e-2


def test_pack_params_nnx_and_plain_ptq_weights():
  x = jax.random.normal(KEY, (3, 16))
  model = NnxMLP(16, 64, 10, rngs=nnx.Rngs(0))
  rules = [LqerRule(module_path='.*fc1.*', weight_qtype=jnp.int4, rank=4),
           qwix.QuantizationRule(module_path='.*', weight_qtype=jnp.int4)]
  qmodel = qwix.quantize_model(model, LqerProvider(rules), x)
  ref = qmodel(x)
  assert lqer.pack_params(qmodel) is qmodel  # in place
  packed = [v for _, v in nnx.iter_graph(qmodel)
            if isinstance(v, packing.PackedInt4)]
  assert len(packed) == 2  # fc1 (LQER) and fc2 (plain PTQ)
  assert any(isinstance(v, lqer.WithLqer) for _, v in nnx.iter_graph(qmodel))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(qmodel, x), ref,
                             rtol=1e-5, atol=1e-5)


def test_packed_weights_need_lqer_matmul():
  model = nn.Dense(32, use_bias=False)
  x = jnp.ones((2, 64))
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4)]
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  params = lqer.pack_params(lqer_quantize_params(
      model.init(KEY, x)['params'],
      jax.eval_shape(qmodel.init, KEY, x)['params']))
  qwix_path = qwix.quantize_model(model, LqerProvider(rules,
                                                      compute_dtype=None))
  with pytest.raises(ValueError, match='packed int4 weight'):
    qwix_path.apply({'params': params}, x)


def test_auto_compute_dtype_by_tokens_and_bits():
  assert matmul.compute_dtype_for(jnp.float32, 4096) == jnp.float32
  small = matmul.compute_dtype_for('auto', matmul.BF16_MIN_TOKENS - 1)
  large = matmul.compute_dtype_for('auto', matmul.BF16_MIN_TOKENS)
  assert small == jnp.float32
  assert large == (jnp.bfloat16 if jax.default_backend() == 'cpu'
                   else jnp.float32)
  assert matmul.compute_dtype_for('auto', 4096, 8) == jnp.float32
  int8 = qarray.QArray(qvalue=jnp.zeros((4, 2), jnp.int8),
                       scale=jnp.ones((1, 2)))
  assert matmul.qtype_bits(int8) == 8
  assert matmul.qtype_bits(qarray.QArray(
      qvalue=jnp.zeros((4, 2), jnp.int4), scale=jnp.ones((1, 2)))) == 4
  assert matmul.qtype_bits(dataclasses.replace(int8, qtype='nf4')) == 4


def test_auto_keeps_int8_weights_in_float32():
  """bf16 rounding would be as large as int8's error: 'auto' = float32."""
  model = nn.Dense(64, use_bias=False)
  x = jax.random.normal(KEY, (2, 40, 32))  # 80 rows
  rules = [LqerRule(weight_qtype=jnp.int8, rank=4)]
  outs = {}
  for cd in ('auto', jnp.float32):
    qmodel = qwix.quantize_model(model, LqerProvider(rules, compute_dtype=cd))
    params = qmodel.init(KEY, x)['params']
    outs[str(cd)] = jax.jit(qmodel.apply)({'params': params}, x)
  np.testing.assert_array_equal(outs['auto'], outs[str(jnp.float32)])
