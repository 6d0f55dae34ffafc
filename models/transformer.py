"""A small decoder-only Transformer, in Linen and in NNX.

Per block: q, k, v as DenseGeneral (d_model -> heads x head_dim), the
attention output as DenseGeneral over (heads, head_dim), and a two-layer FFN.
An input projection `embed` and an output projection `head` frame the blocks,
so every matmul is a weight that Qwix can intercept (2 + 6 per block).
"""

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp


def causal_attention(q, k, v):
  """Softmax(q k^T / sqrt(d)) v with a causal mask; q, k, v (b, t, h, d)."""
  t = q.shape[1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(q.shape[-1])
  mask = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


class Block(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, x):
    head_dim = self.d_model // self.num_heads
    h = nn.LayerNorm()(x)
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), name=name)
    q, k, v = proj('query')(h), proj('key')(h), proj('value')(h)
    att = causal_attention(q, k, v)
    x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), name='out')(att)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.d_ff, name='fc1')(h)
    return x + nn.Dense(self.d_model, name='fc2')(nn.gelu(h))


class Transformer(nn.Module):
  """Float features (b, t, d_in) -> (b, t, d_out)."""

  d_model: int = 64
  num_heads: int = 4
  d_ff: int = 256
  num_layers: int = 2
  d_out: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.d_model, name='embed')(x)
    for i in range(self.num_layers):
      x = Block(self.d_model, self.num_heads, self.d_ff, name=f'block_{i}')(x)
    return nn.Dense(self.d_out, name='head')(nn.LayerNorm()(x))


class NnxBlock(nnx.Module):
  """NNX block: q/k/v/out as nnx.Einsum, FFN as nnx.Linear."""

  def __init__(self, d_model, num_heads, d_ff, *, rngs):
    hd = d_model // num_heads
    qkv = lambda: nnx.Einsum(
      'btd,dhk->bthk', (d_model, num_heads, hd), (num_heads, hd), rngs=rngs
    )
    self.query, self.key, self.value = qkv(), qkv(), qkv()
    self.out = nnx.Einsum(
      'bthk,hkd->btd', (num_heads, hd, d_model), (d_model,), rngs=rngs
    )
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.fc1 = nnx.Linear(d_model, d_ff, rngs=rngs)
    self.fc2 = nnx.Linear(d_ff, d_model, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    att = causal_attention(self.query(h), self.key(h), self.value(h))
    x = x + self.out(att)
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NnxTransformer(nnx.Module):
  """NNX twin of Transformer."""

  def __init__(
    self,
    d_in=16,
    d_model=64,
    num_heads=4,
    d_ff=256,
    num_layers=2,
    d_out=32,
    *,
    rngs: nnx.Rngs,
  ):
    self.embed = nnx.Linear(d_in, d_model, rngs=rngs)
    self.blocks = nnx.List(
      [NnxBlock(d_model, num_heads, d_ff, rngs=rngs) for _ in range(num_layers)]
    )
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, d_out, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))
