"""A Llama-family decoder (Llama, SmolLM2, Qwen2) as Flax Linen modules.

One module tree for every source of weights: `models.smollm2` fills it from
a GGUF file, `models.hf_checkpoint` from a Hugging Face checkpoint directory.
Param paths, as Qwix sees them, for ``i`` in ``0..num_layers-1``::

    embed/embedding
    layers_{i}/attn_norm/scale
    layers_{i}/attn/{q,k,v,o}_proj/kernel   (q, k, v: also bias with
                                             attention_bias, as in Qwen2)
    layers_{i}/mlp_norm/scale
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale
    lm_head/kernel                          (untied embeddings only)

Kernels are Flax ``(in, out)``. Rotary embeddings rotate either adjacent
pairs ``(2i, 2i+1)`` (llama.cpp's layout: GGUF converters permute the query
and key rows) or the two halves of each head (Hugging Face's
``rotate_half``); `LlamaConfig.rope_pairs` says which.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters.

  rope_scaling: ``None`` or sorted ``(key, value)`` pairs of a Hugging Face
  ``rope_scaling`` dict (hashable, so the config can sit in a module).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  rope_theta: float
  rms_eps: float
  max_seq_len: int
  tie_embeddings: bool = True
  rope_pairs: str = 'adjacent'  # or "halves"
  rope_scaling: tuple | None = None
  attention_bias: bool = False
  explicit_head_dim: int | None = None

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.hidden_size // self.num_heads


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
  """Inverse frequencies theta^(-2i/d), scaled as ``rope_scaling`` says:
  'linear' divides them by ``factor``; 'llama3' divides the low frequencies
  (wavelength > original_max_position_embeddings / low_freq_factor) by
  ``factor``, keeps the high ones and interpolates in between."""
  d = config.head_dim
  inv_freq = config.rope_theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  scaling = dict(config.rope_scaling or ())
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise ValueError(
      f'rope_scaling type {kind!r} is not supported; supported:'
      f' {", ".join(ROPE_TYPES)}'
    )
  if kind == 'linear':
    return inv_freq / scaling['factor']
  if kind == 'llama3':
    factor, old_len = (
      scaling['factor'],
      scaling['original_max_position_embeddings'],
    )
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return jnp.where(
      wavelen > old_len / low,
      inv_freq / factor,
      jnp.where(wavelen < old_len / high, inv_freq, mid),
    )
  return inv_freq


def apply_rope(
  x: jax.Array, inv_freq: jax.Array, pairs: str = 'adjacent'
) -> jax.Array:
  """Rotary position embedding of ``x`` ``(batch, seq, heads, head_dim)``,
  positions ``0..seq-1``: pair ``j`` is rotated by ``pos * inv_freq[j]``.
  pairs 'adjacent': pair j is ``(x[2j], x[2j+1])``; 'halves': ``(x[j],
  x[j + head_dim/2])``."""
  seq, head_dim = x.shape[1], x.shape[-1]
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  if pairs == 'halves':
    x0, x1 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return jnp.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  pairs_ = x.reshape(*x.shape[:-1], head_dim // 2, 2)
  x0, x1 = pairs_[..., 0], pairs_[..., 1]
  rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return rotated.reshape(x.shape)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    batch, seq, _ = x.shape
    group = cfg.num_heads // cfg.num_kv_heads
    qkv = functools.partial(nn.Dense, use_bias=cfg.attention_bias)
    q = qkv(cfg.num_heads * cfg.head_dim, name='q_proj')(x)
    k = qkv(cfg.num_kv_heads * cfg.head_dim, name='k_proj')(x)
    v = qkv(cfg.num_kv_heads * cfg.head_dim, name='v_proj')(x)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(
      q.reshape(batch, seq, cfg.num_heads, cfg.head_dim),
      inv_freq,
      cfg.rope_pairs,
    )
    k = apply_rope(
      k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim),
      inv_freq,
      cfg.rope_pairs,
    )
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    # Query head h attends with kv head h // group.
    q = q.reshape(batch, seq, cfg.num_kv_heads, group, cfg.head_dim)
    scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k) / np.sqrt(cfg.head_dim)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v)
    out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
    return nn.Dense(cfg.hidden_size, use_bias=False, name='o_proj')(out)


class MLP(nn.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, use_bias=False)
    gate = dense(cfg.intermediate_size, name='gate_proj')(x)
    up = dense(cfg.intermediate_size, name='up_proj')(x)
    return dense(cfg.hidden_size, name='down_proj')(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """Pre-norm Llama decoder block."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.config.rms_eps
    x = x + Attention(self.config, name='attn')(
      nn.RMSNorm(eps, name='attn_norm')(x)
    )
    return x + MLP(self.config, name='mlp')(nn.RMSNorm(eps, name='mlp_norm')(x))


class LlamaForCausalLM(nn.Module):
  """Causal language model: int token ids ``(batch, seq)`` -> float32 logits
  ``(batch, seq, vocab)``. Positions always start at 0 (no KV cache)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name='embed')
    x = embed(input_ids)
    for i in range(cfg.num_layers):
      x = DecoderBlock(cfg, name=f'layers_{i}')(x)
    x = nn.RMSNorm(cfg.rms_eps, name='norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, name='lm_head')(x)
    return logits.astype(jnp.float32)


class SingleBlock(nn.Module):
  """Decoder block ``layer`` alone, under its param path ``layers_{layer}``,
  so that rules written for the whole model's paths match it as they would
  there (`lqer.checkpoints.streaming` quantizes one block at a time this way;
  ``scanned_hidden`` runs ``layer=0`` over the stacked layers)."""

  config: LlamaConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return DecoderBlock(self.config, name=f'layers_{self.layer}')(x)


def stack_layers(params: dict, num_layers: int) -> dict:
  """``params`` with ``layers_0 .. layers_{n-1}`` replaced by one entry,
  ``layers``, whose leaves are stacked on a new leading axis (every block
  must have the same param structure, quantization included)."""
  rest = {k: v for k, v in params.items() if not k.startswith('layers_')}
  blocks = [params[f'layers_{i}'] for i in range(num_layers)]
  return rest | {'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of ``stack_layers``."""
  rest = {k: v for k, v in params.items() if k != 'layers'}
  return rest | {
    f'layers_{i}': jax.tree.map(lambda x: x[i], params['layers'])
    for i in range(num_layers)
  }


def scanned_hidden(
  block_apply, config: LlamaConfig, params: dict, input_ids: jax.Array
) -> jax.Array:
  """Final normed hidden states, with the blocks run by ``lax.scan`` over
  ``stack_layers`` params, each block rematerialised, so that a backward
  pass holds one block's activations at a time (XLA:CPU does not keep
  unrolled ``remat`` blocks apart). ``block_apply`` is
  ``SingleBlock(config).apply``, or that of a Qwix-wrapped SingleBlock."""
  x = jnp.take(params['embed']['embedding'], input_ids, axis=0)
  body = jax.checkpoint(
    lambda x, layer: (block_apply({'params': {'layers_0': layer}}, x), None)
  )
  x, _ = jax.lax.scan(body, x, params['layers'])
  return nn.RMSNorm(config.rms_eps).apply({'params': params['norm']}, x)


def output_logits(params, hidden: jax.Array) -> jax.Array:
  """Logits of final hidden states, as ``LlamaForCausalLM`` computes them,
  without a transposed copy of a tied embedding."""
  if 'lm_head' in params:
    return hidden @ params['lm_head']['kernel']
  return jnp.einsum('...d,vd->...v', hidden, params['embed']['embedding'])


def _window_nll(module: nn.Module, params, windows: jax.Array) -> jax.Array:
  """Summed next-token NLL of tokens ``1..window-1`` for each window."""
  logits = module.apply({'params': params}, windows)
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  targets = windows[:, 1:, None]
  return -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0].sum(axis=1)


def perplexity(
  module: nn.Module,
  params,
  token_ids: np.ndarray,
  window: int = 512,
  batch_size: int = 4,
  progress: bool = False,
) -> float:
  """Perplexity over non-overlapping windows of ``window`` tokens.

  Each window is scored independently (no context carried over): tokens
  ``1..window-1`` are predicted from the preceding tokens of the same window.
  A trailing partial window is dropped. The forward pass is jitted once with
  a fixed ``(batch_size, window)`` shape; the last batch is padded with
  copies of its first window, which are not counted.

  Returns:
    ``exp(mean NLL)`` over all scored tokens.
  """
  token_ids = np.asarray(token_ids, np.int32).ravel()
  n_windows = len(token_ids) // window
  if n_windows == 0:
    raise ValueError(f'need at least {window} tokens, got {len(token_ids)}')
  windows = token_ids[: n_windows * window].reshape(n_windows, window)
  nll_fn = jax.jit(functools.partial(_window_nll, module))
  total = 0.0
  starts = range(0, n_windows, batch_size)
  if progress:
    starts = tqdm(starts, desc='perplexity', unit='batch', leave=False)
  for start in starts:
    batch = windows[start : start + batch_size]
    n_real = len(batch)
    if n_real < batch_size:
      batch = np.concatenate(
        [batch, np.repeat(batch[:1], batch_size - n_real, 0)]
      )
    total += float(
      np.sum(np.asarray(nll_fn(params, batch))[:n_real], dtype=np.float64)
    )
  return float(np.exp(total / (n_windows * (window - 1))))
