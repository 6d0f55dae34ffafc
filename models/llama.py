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

Decoding: ``LlamaForCausalLM(config).apply(variables, ids, cache)`` with a
`KVCache` (`init_cache`) runs the new tokens at positions ``cache.index``
onward and returns the last position's logits and the updated cache, under
the same module names (a Qwix-wrapped model quantizes the same ops);
`Decoder` jits a prefill and a one-token step on a fixed cache length.

Kernels are Flax ``(in, out)``. Rotary embeddings rotate either adjacent
pairs ``(2i, 2i+1)`` (llama.cpp's layout: GGUF converters permute the query
and key rows) or the two halves of each head (Hugging Face's
``rotate_half``); `LlamaConfig.rope_pairs` says which.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

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
  x: jax.Array, inv_freq: jax.Array, pairs: str = 'adjacent', offset=None
) -> jax.Array:
  """Rotary position embedding of ``x`` ``(batch, seq, heads, head_dim)``,
  positions ``offset..offset+seq-1`` (None: from 0): pair ``j`` is rotated
  by ``pos * inv_freq[j]``. pairs 'adjacent': pair j is ``(x[2j],
  x[2j+1])``; 'halves': ``(x[j], x[j + head_dim/2])``."""
  seq, head_dim = x.shape[1], x.shape[-1]
  positions = jnp.arange(seq, dtype=jnp.float32)
  if offset is not None:
    positions = (jnp.arange(seq) + offset).astype(jnp.float32)
  angles = positions[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  if pairs == 'halves':
    x0, x1 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return jnp.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  pairs_ = x.reshape(*x.shape[:-1], head_dim // 2, 2)
  x0, x1 = pairs_[..., 0], pairs_[..., 1]
  rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return rotated.reshape(x.shape)


class KVCache(NamedTuple):
  """Keys and values of the positions decoded so far.

  keys, values: one ``(batch, length, num_kv_heads, head_dim)`` array per
  layer (rotary embedding applied to the keys); index: int32 scalar, the
  positions ``0..index-1`` filled (the next token's position)."""

  keys: tuple
  values: tuple
  index: jax.Array


def init_cache(
  config: LlamaConfig, batch: int, length: int, dtype=jnp.float32
) -> KVCache:
  """An empty `KVCache` of ``length`` positions (at most max_seq_len)."""
  if not 0 < length <= config.max_seq_len:
    raise ValueError(
      f'cache length must be in [1, {config.max_seq_len}] (the model'
      f" config's max_seq_len), got {length}"
    )
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  zeros = lambda: tuple(
    jnp.zeros(shape, dtype) for _ in range(config.num_layers)
  )
  return KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32))


def _attend(q, k, v, visible, head_dim):
  """Softmax attention of q ``(b, q, kv, group, d)`` over k, v ``(b, s, kv,
  d)`` where ``visible`` ``(q, s)`` is True; ``(b, q, kv, group, d)``."""
  scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k) / np.sqrt(head_dim)
  scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum('bkgqs,bskd->bqkgd', probs, v)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary embeddings.

  With ``cache`` (this layer's keys and values) and ``index`` (the first new
  position), the new tokens' keys and values are written into the cache at
  ``index`` and the queries attend to positions ``0..index+seq-1``; returns
  ``(output, (keys, values))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache=None, index=None):
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
      index,
    )
    k = apply_rope(
      k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim),
      inv_freq,
      cfg.rope_pairs,
      index,
    )
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    # Query head h attends with kv head h // group.
    q = q.reshape(batch, seq, cfg.num_kv_heads, group, cfg.head_dim)
    if cache is None:
      visible = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    else:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(
        cache[0], k.astype(cache[0].dtype), start
      )
      v = jax.lax.dynamic_update_slice(
        cache[1], v.astype(cache[1].dtype), start
      )
      visible = (
        jnp.arange(k.shape[1])[None, :] <= index + jnp.arange(seq)[:, None]
      )
    out = _attend(q, k, v, visible, cfg.head_dim)
    out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
    out = nn.Dense(cfg.hidden_size, use_bias=False, name='o_proj')(out)
    return out if cache is None else (out, (k, v))


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
  def __call__(self, x: jax.Array, cache=None, index=None):
    """``x`` -> the block's output; with ``cache`` (`Attention`): ``(output,
    (keys, values))``."""
    eps = self.config.rms_eps
    attn = Attention(self.config, name='attn')(
      nn.RMSNorm(eps, name='attn_norm')(x), cache, index
    )
    if cache is not None:
      attn, cache = attn
    x = x + attn
    x = x + MLP(self.config, name='mlp')(nn.RMSNorm(eps, name='mlp_norm')(x))
    return x if cache is None else (x, cache)


class LlamaForCausalLM(nn.Module):
  """Causal language model: int token ids ``(batch, seq)`` -> float32 logits
  ``(batch, seq, vocab)``, positions from 0.

  With a `KVCache`: the tokens sit at positions ``cache.index`` onward;
  returns ``(logits, cache)``, the logits of the last position only
  ``(batch, 1, vocab)`` and the cache with the new tokens written."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, cache: KVCache | None = None):
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name='embed')
    x = embed(input_ids)
    keys, values = [], []
    for i in range(cfg.num_layers):
      block = DecoderBlock(cfg, name=f'layers_{i}')
      if cache is None:
        x = block(x)
      else:
        x, (k, v) = block(x, (cache.keys[i], cache.values[i]), cache.index)
        keys.append(k)
        values.append(v)
    if cache is not None:
      x = x[:, -1:]
    x = nn.RMSNorm(cfg.rms_eps, name='norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, name='lm_head')(x)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    index = cache.index + input_ids.shape[1]
    return logits, KVCache(tuple(keys), tuple(values), index)


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


def untie_head(module: LlamaForCausalLM, params: dict):
  """``(module, params)`` with a tied LM head made its own ``lm_head``
  Dense: ``lm_head/kernel`` = the embedding table transposed (a copy), so
  rules can quantize the head for serving while the lookup keeps reading
  the float table; the logits are the same. An untied model is returned as
  it is."""
  if not module.config.tie_embeddings:
    return module, params
  config = dataclasses.replace(module.config, tie_embeddings=False)
  head = {'kernel': jnp.asarray(params['embed']['embedding']).T}
  return type(module)(config), {**params, 'lm_head': head}


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
  a fixed ``(min(batch_size, windows), window)`` shape; the last batch is
  padded with copies of its first window, which are not counted.

  Returns:
    ``exp(mean NLL)`` over all scored tokens.
  """
  token_ids = np.asarray(token_ids, np.int32).ravel()
  n_windows = len(token_ids) // window
  if n_windows == 0:
    raise ValueError(f'need at least {window} tokens, got {len(token_ids)}')
  windows = token_ids[: n_windows * window].reshape(n_windows, window)
  batch_size = min(batch_size, n_windows)
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


def sample(logits: jax.Array, key, temperature: float = 0.0, top_k: int = 0):
  """Token ids ``(batch,)`` from logits ``(batch, vocab)``: the argmax at
  temperature 0, else a draw from softmax(logits / temperature) over the
  ``top_k`` largest (0: all)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  """`Decoder.generate`'s result: the new token ids (up to, not including, a
  stop token), and seconds of the prefill (prompt and first token) and of
  ``decode_steps`` one-token steps after it."""

  tokens: list[int]
  prompt_tokens: int
  prefill_seconds: float
  decode_steps: int
  decode_seconds: float

  @property
  def prompt_tokens_per_second(self) -> float:
    return self.prompt_tokens / self.prefill_seconds

  @property
  def decode_tokens_per_second(self) -> float:
    return self.decode_steps / self.decode_seconds if self.decode_steps else 0


class Decoder:
  """Greedy or sampled decoding of a `LlamaForCausalLM` (or the same module
  wrapped by ``qwix.quantize_model``) with a `KVCache` of ``cache_len``
  positions, batch 1.

  One jitted function runs the prompt (prefill) and each one-token step
  (cache donated, updated in place); `compile` builds both shapes ahead, so
  decoding compiles once per prompt length. Step ``i`` samples with
  ``fold_in(key, i)``."""

  def __init__(
    self,
    module: nn.Module,
    config: LlamaConfig,
    cache_len: int,
    temperature: float = 0.0,
    top_k: int = 0,
  ):
    if temperature < 0 or top_k < 0:
      raise ValueError(
        f'temperature and top_k must be >= 0, got {temperature}, {top_k}'
      )
    self.module, self.config, self.cache_len = module, config, cache_len
    self.temperature, self.top_k = temperature, top_k
    self._jitted = jax.jit(self._run, donate_argnums=2)
    self._compiled = {}

  def _run(self, params, ids, cache, key):
    logits, cache = self.module.apply({'params': params}, ids, cache)
    key = jax.random.fold_in(key, cache.index)
    token = sample(logits[:, -1], key, self.temperature, self.top_k)
    return token[:, None], cache

  def _fn(self, params, length):
    """The compiled function for ``length`` new tokens per call."""
    if length not in self._compiled:
      ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
      cache = jax.eval_shape(
        functools.partial(init_cache, self.config, 1, self.cache_len)
      )
      key = jax.eval_shape(jax.random.key, 0)
      self._compiled[length] = self._jitted.lower(
        params, ids, cache, key
      ).compile()
    return self._compiled[length]

  def compile(self, params, prompt_len: int) -> float:
    """Compiles the prefill of ``prompt_len`` tokens and the one-token step;
    returns the seconds it took."""
    start = time.perf_counter()
    self._fn(params, prompt_len)
    self._fn(params, 1)
    return time.perf_counter() - start

  def generate(
    self, params, prompt_ids, max_new_tokens: int, key=None, stop_ids=()
  ) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt_ids`` (1-D), ending
    early after a token in ``stop_ids``. Each step is dispatched before the
    previous token is read back, so the stop check does not stall it."""
    prompt = np.asarray(prompt_ids, np.int32)[None]
    if prompt.shape[1] < 1 or max_new_tokens < 1:
      raise ValueError('need at least one prompt token and one new token')
    if prompt.shape[1] + max_new_tokens > self.cache_len:
      raise ValueError(
        f'{prompt.shape[1]} prompt tokens + {max_new_tokens} new tokens do'
        f' not fit the cache of {self.cache_len} positions'
      )
    key = jax.random.key(0) if key is None else key
    prefill, step = self._fn(params, prompt.shape[1]), self._fn(params, 1)
    cache = jax.block_until_ready(init_cache(self.config, 1, self.cache_len))
    start = time.perf_counter()
    token, cache = prefill(params, prompt, cache, key)
    last = int(np.asarray(token)[0, 0])
    prefill_seconds = time.perf_counter() - start
    out, steps = [token], 0
    start = time.perf_counter()
    while len(out) < max_new_tokens and last not in stop_ids:
      token, cache = step(params, token, cache, key)
      steps += 1
      out.append(token)
      if stop_ids:  # the previous token, read while this step runs
        last = int(np.asarray(out[-2])[0, 0])
    tokens = [int(np.asarray(t)[0, 0]) for t in out]
    decode_seconds = time.perf_counter() - start
    stops = [i for i, t in enumerate(tokens) if t in stop_ids]
    return Generation(
      tokens[: stops[0]] if stops else tokens,
      prompt.shape[1],
      prefill_seconds,
      steps,
      decode_seconds,
    )
