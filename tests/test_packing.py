"""Packed int4 weights (lqer.pack_params) and the per-shape compute dtype."""

import dataclasses

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from qwix._src.core import einsum_info
from qwix._src.core import qarray
from qwix._src.providers import ptq

import lqer
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.providers import matmul
from lqer.quant import bits
from lqer.quant import packing
from models import NnxMLP
from models import Transformer

KEY = jax.random.key(0)


def _int4_qarray(rng, shape, groups):
  """Random int4 QArray with a per-group scale along axis 0 (and NumPy)."""
  q = rng.integers(-8, 8, size=shape).astype(np.int8)
  scale = rng.uniform(0.5, 2.0, size=(groups, *shape[1:])).astype(np.float32)
  arr = qarray.QArray(
    qvalue=jnp.asarray(q).astype(jnp.int4), scale=jnp.asarray(scale)
  )
  w = (q.reshape(groups, -1, *shape[1:]) * scale[:, None]).reshape(shape)
  return arr, w.astype(np.float32)


# (1408, 64) / 11 groups: six row blocks on the one-token path, the last
# one short; (2048, 8) / 1 group: row blocks inside one scale group.
@pytest.mark.parametrize(
  'shape,groups',
  [
    ((256, 96), 2),
    ((64, 3, 8), 1),
    ((128, 130), 4),
    ((1408, 64), 11),
    ((2048, 8), 1),
  ],
)
@pytest.mark.parametrize('tokens', [1, 5, 40, 70])  # 40: 16-row dot slices
def test_packed_matmul_matches_numpy(shape, groups, tokens):
  rng = np.random.default_rng(tokens)
  arr, w = _int4_qarray(rng, shape, groups)
  layout = lqer.core.layout.KernelLayout(shape, (0,), ())
  assert packing.unpackable_reason(arr, layout) is None
  p = packing.pack(arr)
  assert p.packed.dtype == jnp.uint8
  assert p.packed.size * 2 == arr.qvalue.size  # same bytes as packed int4
  x = rng.normal(size=(tokens, shape[0])).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  ref = np.tensordot(x.astype(np.float64), w, axes=([1], [0]))
  y = jax.jit(lambda x, p: packing.packed_dot_general(x, p, dims, jnp.float32))(
    x, p
  )
  # float32 sums: 1e-4 up to 256 contracted rows, growing with the rows.
  np.testing.assert_allclose(
    y, ref, rtol=1e-5, atol=1e-4 * max(1, shape[0] / 256)
  )
  y16 = packing.packed_dot_general(x, p, dims, jnp.bfloat16)
  assert float(np.linalg.norm(y16 - ref) / np.linalg.norm(ref)) < 1e-2


def test_packed_bytes_follow_the_documented_layout():
  """p[i, j] = (q[i, j] & 15) | (q[i, j + out/2] & 15) << 4, in NumPy."""
  rng = np.random.default_rng(2)
  arr, _ = _int4_qarray(rng, (8, 12), 1)
  q = np.asarray(arr.qvalue.astype(jnp.int8)).astype(np.int64)
  want = (q[:, :6] & 15) | ((q[:, 6:] & 15) << 4)
  np.testing.assert_array_equal(np.asarray(packing.pack(arr).packed), want)


@pytest.mark.parametrize(
  'scale_shape', [(2, 1, 6), (1, 2, 6), (4, 2, 6), (2, 8, 6)]
)
def test_packed_matmul_two_contracting_axes(scale_shape):
  """An attention output kernel (heads, head_dim, d), its scale tiled along
  one contracting axis (the rows reordered so groups are consecutive)."""
  rng = np.random.default_rng(1)
  q = rng.integers(-8, 8, size=(4, 8, 6)).astype(np.int8)
  scale = rng.uniform(0.5, 2.0, size=scale_shape).astype(np.float32)
  arr = qarray.QArray(
    qvalue=jnp.asarray(q).astype(jnp.int4), scale=jnp.asarray(scale)
  )
  w = np.asarray(qarray.dequantize(arr))
  layout = lqer.core.layout.KernelLayout((4, 8, 6), (0, 1), ())
  assert packing.unpackable_reason(arr, layout) is None
  p = packing.pack(arr, layout)
  x = rng.normal(size=(3, 8, 4)).astype(np.float32)  # contract axes 2, 1
  dims = (((2, 1), (0, 1)), ((), ()))
  for xx in (x, x[:1]):
    y = packing.packed_dot_general(xx, p, dims, jnp.float32)
    np.testing.assert_allclose(
      y, np.einsum('bjh,hjo->bo', xx, w), rtol=1e-5, atol=1e-4
    )
  np.testing.assert_array_equal(packing.unpack(p).scale, scale)


def test_unpackable_weights_are_named_and_left_alone():
  rng = np.random.default_rng(0)
  arr, _ = _int4_qarray(rng, (16, 9), 1)
  assert 'odd output' in packing.unpackable_reason(
    arr, lqer.core.layout.KernelLayout((16, 9), (0,), ())
  )
  arr, _ = _int4_qarray(rng, (16, 8), 2)
  layout = lqer.core.layout.KernelLayout((16, 8), (0,), ())
  assert 'zero point' in packing.unpackable_reason(
    arr.replace(zero_point=jnp.zeros_like(arr.scale)), layout
  )
  tiled = arr.replace(scale=jnp.ones((2, 2)))  # 2-D tiles: 8 x 4
  assert 'kernel axis 1' in packing.unpackable_reason(tiled, layout)
  arr = qarray.QArray(
    qvalue=jnp.zeros((4, 8, 6), jnp.int4), scale=jnp.ones((2, 4, 6))
  )  # tiles of 2 x 2 rows
  assert 'several contracting' in packing.unpackable_reason(
    arr, lqer.core.layout.KernelLayout((4, 8, 6), (0, 1), ())
  )
  int8 = qarray.QArray(
    qvalue=jnp.zeros((16, 8), jnp.int8), scale=jnp.ones((1, 8))
  )
  assert 'int4' in packing.unpackable_reason(
    int8, lqer.core.layout.KernelLayout((16, 8), (0,), ())
  )


@pytest.mark.parametrize('compute_dtype', [jnp.float32, 'auto'])
def test_pack_params_linen_same_output(compute_dtype):
  """Packing changes the storage, not the numbers (Dense + DenseGeneral)."""
  model = Transformer()
  x = jax.random.normal(KEY, (2, 40, 16))  # 80 tokens: 'auto' picks bf16
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=8)]
  qmodel = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=compute_dtype)
  )
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  params = lqer_quantize_params(fp, abstract)
  packed = lqer.pack_params(params)
  kinds = {
    type(w.array).__name__
    for w in jax.tree.leaves(
      packed, is_leaf=lambda v: isinstance(v, lqer.WithLqer)
    )
    if isinstance(w, lqer.WithLqer)
  }
  assert kinds == {'PackedInt4'}  # incl. DenseGeneral out (2 contracting)
  f32 = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=jnp.float32)
  )
  for xx in (x, x[:1, :1]):
    ref = jax.jit(qmodel.apply)({'params': params}, xx)
    y = jax.jit(qmodel.apply)({'params': packed}, xx)
    if compute_dtype == jnp.float32:
      # Same dequantized values; the branch is added per block (f32 rounding).
      np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    else:  # bf16 dots at 80 rows: both within bf16 rounding of float32
      exact = jax.jit(f32.apply)({'params': params}, xx)
      for out in (y, ref):
        assert (
          float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)) < 1e-2
        )


def test_pack_params_nnx_and_plain_ptq_weights():
  x = jax.random.normal(KEY, (3, 16))
  model = NnxMLP(16, 64, 10, rngs=nnx.Rngs(0))
  rules = [
    LqerRule(module_path='.*fc1.*', weight_qtype=jnp.int4, rank=4),
    qwix.QuantizationRule(module_path='.*', weight_qtype=jnp.int4),
  ]
  qmodel = qwix.quantize_model(model, LqerProvider(rules), x)
  ref = qmodel(x)
  assert lqer.pack_params(qmodel) is qmodel  # in place
  packed = [
    v for _, v in nnx.iter_graph(qmodel) if isinstance(v, packing.PackedInt4)
  ]
  assert len(packed) == 2  # fc1 (LQER) and fc2 (plain PTQ)
  assert any(isinstance(v, lqer.WithLqer) for _, v in nnx.iter_graph(qmodel))
  np.testing.assert_allclose(
    nnx.jit(lambda m, x: m(x))(qmodel, x), ref, rtol=1e-5, atol=1e-5
  )


def test_packed_weights_need_lqer_matmul():
  model = nn.Dense(32, use_bias=False)
  x = jnp.ones((2, 64))
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4)]
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  params = lqer.pack_params(
    lqer_quantize_params(
      model.init(KEY, x)['params'],
      jax.eval_shape(qmodel.init, KEY, x)['params'],
    )
  )
  qwix_path = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=None)
  )
  with pytest.raises(ValueError, match='packed int4 weight'):
    qwix_path.apply({'params': params}, x)


def test_auto_compute_dtype_by_tokens_and_bits():
  assert matmul.compute_dtype_for(jnp.float32, 4096) == jnp.float32
  small = matmul.compute_dtype_for('auto', matmul.BF16_MIN_TOKENS - 1)
  large = matmul.compute_dtype_for('auto', matmul.BF16_MIN_TOKENS)
  assert small == jnp.float32
  assert large == (
    jnp.bfloat16 if jax.default_backend() == 'cpu' else jnp.float32
  )
  assert matmul.compute_dtype_for('auto', 4096, 8) == jnp.float32
  int8 = qarray.QArray(
    qvalue=jnp.zeros((4, 2), jnp.int8), scale=jnp.ones((1, 2))
  )
  assert bits.weight_bits(int8) == 8
  assert (
    bits.weight_bits(
      qarray.QArray(qvalue=jnp.zeros((4, 2), jnp.int4), scale=jnp.ones((1, 2)))
    )
    == 4
  )
  assert bits.weight_bits(dataclasses.replace(int8, qtype='nf4')) == 4


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


# Kernel layouts: Google's gemma library (q, kv, gated MLP, attention out),
# nn.Einsum pairing contracting axes in reverse order, an einsum batch axis.
# name: (einsum, kernel shape, tile size, input shape for `tokens` tokens).
# Qwix tiles the last contracting kernel axis: in 'out' and 'pairs' the
# scale is shared along the other one, so the rows are packed tiled-first.
LAYOUTS = {
  'q': ('BTD,NDH->BTNH', (2, 256, 128), 128, lambda t: (1, t, 256)),
  'kv': ('BSD,CKDH->CBSKH', (2, 1, 256, 128), 128, lambda t: (1, t, 256)),
  'gating': ('...D,NFD->...NF', (2, 256, 256), 128, lambda t: (1, t, 256)),
  'out': ('BTNH,NHD->BTD', (2, 256, 256), 128, lambda t: (1, t, 2, 256)),
  'pairs': ('xtab,bao->xto', (6, 4, 8), 2, lambda t: (1, t, 4, 6)),
  'batch': ('BNH,NHD->BND', (2, 128, 64), 128, lambda t: (t, 2, 128)),
}


def _rules(tile):
  return [
    LqerRule(
      weight_qtype=jnp.int4,
      tile_size=tile,
      rank=8,
      method='svd',
      solver='exact',
    )
  ]


def _rel(y, ref):
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


@pytest.fixture
def small_blocks(monkeypatch):
  """Several column blocks (>1 token) and row blocks (1 token) per kernel;
  96-row blocks straddle the 128-row scale groups."""
  monkeypatch.setattr(packing, 'BLOCK_BYTES', 128 << 10)
  monkeypatch.setattr(packing, 'MATVEC_BLOCK_ROWS', 96)


def _packed_arrays(tree):
  return [
    w.array
    for w in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, ptq.WithAux))
    if isinstance(w, ptq.WithAux)
  ]


@pytest.mark.parametrize('name', LAYOUTS)
def test_pack_unpack_is_bit_exact_and_matmul_matches_dot_general(name):
  """unpack(pack(q)) == q; the packed matmul == dot_general on deq(q),
  with a branch (xa, b) as the provider passes it, flattened."""
  eq, shape, tile, x_shape = LAYOUTS[name]
  info = einsum_info.EinsumInfo.parse(eq, ndims=(len(x_shape(1)), len(shape)))
  (_, rhs_c), (_, rhs_b) = dims = info.dimension_numbers
  layout = lqer.core.layout.KernelLayout(
    shape, tuple(sorted(rhs_c)), tuple(sorted(rhs_b))
  )
  tiled = {max(rhs_c): tile} if tile else {}
  q = qwix.quantize(
    jax.random.normal(KEY, shape),
    jnp.int4,
    channelwise_axes=layout.batch_axes + layout.output_axes,
    tiled_axes=tiled,
  )
  assert packing.unpackable_reason(q, layout) is None
  p = packing.pack(q, layout)
  back = packing.unpack(p)
  assert back.qvalue.dtype == q.qvalue.dtype and back.qtype == q.qtype
  np.testing.assert_array_equal(
    back.qvalue.astype(jnp.int8), q.qvalue.astype(jnp.int8)
  )
  np.testing.assert_array_equal(back.scale, q.scale)
  w = np.asarray(qarray.dequantize(q))
  rng = np.random.default_rng(0)
  for tokens in (1, 5):
    x = rng.normal(size=x_shape(tokens)).astype(np.float32)
    xa = rng.normal(
      size=(
        *[x.shape[a] for a in dims[1][0]],
        *[
          x.shape[a] for a in range(x.ndim) if a not in dims[0][0] + dims[1][0]
        ],
        3,
      )
    )
    b = rng.normal(size=layout.b_shape(3))
    y = packing.packed_dot_general(
      x,
      p,
      dims,
      jnp.float32,
      (
        jnp.asarray(xa.reshape(-1, 3), jnp.float32),
        jnp.asarray(b.reshape(3, -1), jnp.float32),
      ),
    )
    branch_dims = layout.branch_dimension_numbers(x.ndim, dims)[1]
    ref = jax.lax.dot_general(
      x, w, dims, precision='highest'
    ) + jax.lax.dot_general(xa, b, branch_dims, precision='highest')
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_batch_axes_in_another_order_than_the_kernel():
  """'xyb,yxbd->xyd': the call batches kernel axes (1, 0), in that order."""
  rng = np.random.default_rng(3)
  arr, _ = _int4_qarray(rng, (4, 3, 64, 8), 1)
  layout = lqer.core.layout.KernelLayout((4, 3, 64, 8), (2,), (0, 1))
  p = packing.pack(arr, layout)
  x = rng.normal(size=(3, 4, 64)).astype(np.float32)
  dims = (((2,), (2,)), ((0, 1), (1, 0)))
  xa = rng.normal(size=(3, 4, 2)).astype(np.float32)  # (x, y, k): call order
  b = rng.normal(size=(4, 3, 2, 8)).astype(np.float32)  # (y, x, k, d)
  y = packing.packed_dot_general(
    x, p, dims, jnp.float32, (xa.reshape(-1, 2), b.reshape(2, -1))
  )
  w = np.asarray(qarray.dequantize(arr))
  ref = np.einsum('xyb,yxbd->xyd', x, w) + np.einsum('xyk,yxkd->xyd', xa, b)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('groups', [1, 2])
def test_one_token_prime_rows_take_few_blocks(groups):
  """1031 rows per group (prime): blocks of 256 rows, a short last one and,
  with 2 groups, one straddling both, not one block per row."""
  rows = 1031 * groups
  rng = np.random.default_rng(groups)
  arr, w = _int4_qarray(rng, (rows, 16), groups)
  p = packing.pack(arr)
  x = rng.normal(size=(1, rows)).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  f = lambda x, p: packing.packed_dot_general(
    x, p, dims, jnp.float32, kernel='xla'
  )
  eqns = jax.make_jaxpr(f)(x, p).eqns
  dots = sum(e.primitive.name == 'dot_general' for e in eqns)
  assert dots == 2 * -(-rows // packing.MATVEC_BLOCK_ROWS)  # 2 halves
  np.testing.assert_allclose(
    jax.jit(f)(x, p),
    x.astype(np.float64) @ w,
    rtol=1e-5,
    atol=1e-4 * rows / 256,
  )


class GemmaLinenBlock(nn.Module):
  """Gemma's einsums on `self.param` kernels: attention (q, kv, out) and a
  gated MLP (gate and up in one (2, F, D) kernel, then down)."""

  # Distinct kernel shapes: Qwix finds a param in its module by shape.
  d: int = 384
  heads: int = 2
  head_dim: int = 256
  ff: int = 512

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    param = lambda name, *shape: self.param(name, init, shape)
    q = jnp.einsum(
      'BTD,NDH->BTNH', x, param('q', self.heads, self.d, self.head_dim)
    )
    k, v = jnp.einsum(
      'BSD,CKDH->CBSKH', x, param('kv', 2, 1, self.d, self.head_dim)
    )
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + jnp.einsum(
      'BTNH,NHD->BTD', att, param('out', self.heads, self.head_dim, self.d)
    )
    gate, up = jnp.moveaxis(
      jnp.einsum('...D,NFD->...NF', x, param('gating', 2, self.ff, self.d)),
      -2,
      0,
    )
    return x + jnp.einsum(
      '...F,FD->...D', nn.gelu(gate) * up, param('down', self.ff, self.d)
    )


@pytest.mark.usefixtures('small_blocks')
def test_pack_params_gemma_block_linen():
  model = GemmaLinenBlock()
  x = jax.random.normal(KEY, (1, 5, 384))
  provider = LqerProvider(_rules(128), compute_dtype=jnp.float32)
  qmodel = qwix.quantize_model(model, provider)
  params = lqer_quantize_params(
    model.init(KEY, x)['params'], jax.eval_shape(qmodel.init, KEY, x)['params']
  )
  packed = lqer.pack_params(params)
  arrays = _packed_arrays(packed)
  assert len(arrays) == 5
  assert all(isinstance(a, packing.PackedInt4) for a in arrays)
  for xx in (x, x[:, :1]):
    ref = jax.jit(qmodel.apply)({'params': params}, xx)
    y = jax.jit(qmodel.apply)({'params': packed}, xx)
    assert _rel(y, ref) < 1e-4


@pytest.mark.usefixtures('small_blocks')
@pytest.mark.parametrize('name', LAYOUTS)
def test_pack_params_linen_einsum_layouts(name):
  eq, shape, tile, x_shape = LAYOUTS[name]
  model = nn.Einsum(shape, eq, use_bias=False)
  x = jax.random.normal(KEY, x_shape(3))
  qmodel = qwix.quantize_model(
    model, LqerProvider(_rules(tile), compute_dtype=jnp.float32)
  )
  params = lqer_quantize_params(
    model.init(KEY, x)['params'], jax.eval_shape(qmodel.init, KEY, x)['params']
  )
  packed = lqer.pack_params(params)
  assert isinstance(packed['kernel'].array, packing.PackedInt4)
  for xx in (x, jax.random.normal(KEY, x_shape(1))):
    ref = jax.jit(qmodel.apply)({'params': params}, xx)
    y = jax.jit(qmodel.apply)({'params': packed}, xx)
    assert _rel(y, ref) < 1e-4


@pytest.mark.usefixtures('small_blocks')
@pytest.mark.parametrize('name', LAYOUTS)
def test_pack_params_nnx_einsum_layouts(name):
  eq, shape, tile, x_shape = LAYOUTS[name]
  model = nnx.Einsum(eq, shape, rngs=nnx.Rngs(0))
  x = jax.random.normal(KEY, x_shape(3))
  provider = LqerProvider(_rules(tile), compute_dtype=jnp.float32)
  fp = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  qmodel = nnx.eval_shape(lambda: qwix.quantize_model(model, provider, x))
  nnx.update(qmodel, lqer_quantize_params(fp, qmodel))
  forward = lambda m, x: m(x)
  xs = (x, jax.random.normal(KEY, x_shape(1)))
  refs = [nnx.jit(forward)(qmodel, xx) for xx in xs]
  lqer.pack_params(qmodel)
  assert isinstance(qmodel.kernel.array, packing.PackedInt4)
  for xx, ref in zip(xs, refs):
    assert _rel(nnx.jit(forward)(qmodel, xx), ref) < 1e-4


def test_pack_params_warns_once_naming_unpacked_int4_weights():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(9, use_bias=False, name='odd')(x)
      return nn.Dense(8, use_bias=False, name='wide')(x)

  model, x = Two(), jnp.ones((2, 16))
  rules = [
    qwix.QuantizationRule(module_path='odd', weight_qtype=jnp.int4),
    qwix.QuantizationRule(module_path='wide', weight_qtype=jnp.int8),
  ]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  params = qwix.quantize_params(
    model.init(KEY, x)['params'], jax.eval_shape(qmodel.init, KEY, x)['params']
  )
  with pytest.warns(UserWarning) as record:
    packed = lqer.pack_params(params)
  [message] = [
    str(r.message)
    for r in record
    if str(r.message).startswith('lqer.pack_params')
  ]
  assert '1 int4 weight' in message
  assert 'odd/kernel: odd output size 9' in message
  assert 'wide' not in message
  assert not any(
    isinstance(a, packing.PackedInt4) for a in _packed_arrays(packed)
  )


def test_plain_ptq_batch_einsum_falls_back_to_generic_path():
  """A plain Qwix weight does not record its einsum batch axis: it is
  packed as an output axis, and the call dequantizes it whole (warning)."""
  eq, shape, _, x_shape = LAYOUTS['batch']
  model = nn.Einsum(shape, eq, use_bias=False)
  x = jax.random.normal(KEY, x_shape(3))
  rules = [qwix.QuantizationRule(weight_qtype=jnp.int4, tile_size=128)]
  qmodel = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=jnp.float32)
  )
  params = qwix.quantize_params(
    model.init(KEY, x)['params'], jax.eval_shape(qmodel.init, KEY, x)['params']
  )
  packed = lqer.pack_params(params)
  ref = qmodel.apply({'params': params}, x)
  with pytest.warns(UserWarning, match='batch axes'):
    y = qmodel.apply({'params': packed}, x)
  assert _rel(y, ref) < 1e-6
