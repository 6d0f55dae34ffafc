"""Tests of the real-model loaders in models/ against NumPy forwards.

The NumPy references below read the weight files themselves (safetensors for
MiniLM, GGUF for SmolLM2) and implement the published architectures in their
Hugging Face layout, so they share no code with the Flax modules.
"""

import math

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.special import erf

from models import minilm
from models import smollm2
from models import text


def _same_structure(module, args, params) -> bool:
  """Whether ``params`` has exactly the tree and shapes of ``module.init``."""
  init = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))[
    'params'
  ]
  shapes = jax.tree.map(lambda a: a.shape, init)
  return shapes == jax.tree.map(lambda a: a.shape, params)


def _softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def minilm_model():
  return minilm.load_minilm()


def _numpy_minilm(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """BERT + mean pooling + L2 normalisation, in float64 from safetensors."""
  w = {
    k: v.astype(np.float64)
    for k, v in load_file(minilm.model_dir() / 'model.safetensors').items()
    if k != 'embeddings.position_ids'
  }
  n_heads, eps = 12, 1e-12

  def linear(x, name):
    return x @ w[f'{name}.weight'].T + w[f'{name}.bias']

  def layer_norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f'{name}.weight'] + w[
      f'{name}.bias'
    ]

  batch, seq = ids.shape
  x = (
    w['embeddings.word_embeddings.weight'][ids]
    + w['embeddings.position_embeddings.weight'][:seq][None]
    + w['embeddings.token_type_embeddings.weight'][0]
  )
  x = layer_norm(x, 'embeddings.LayerNorm')
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
  for i in range(6):
    p = f'encoder.layer.{i}'
    split = lambda t: t.reshape(batch, seq, n_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (
      split(linear(x, f'{p}.attention.self.{n}'))
      for n in ('query', 'key', 'value')
    )
    probs = _softmax(
      q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + bias
    )
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
    x = layer_norm(
      x + linear(ctx, f'{p}.attention.output.dense'),
      f'{p}.attention.output.LayerNorm',
    )
    h = linear(x, f'{p}.intermediate.dense')
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    x = layer_norm(x + linear(h, f'{p}.output.dense'), f'{p}.output.LayerNorm')
  m = mask[..., None].astype(np.float64)
  pooled = (x * m).sum(1) / m.sum(1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.mark.slow
def test_minilm_params_match_init(minilm_model):
  module, params, _ = minilm_model
  ids = np.zeros((1, 8), np.int32)
  assert _same_structure(module, (ids, np.ones_like(ids)), params)


@pytest.mark.slow
def test_minilm_matches_numpy_reference(minilm_model):
  module, params, tokenizer = minilm_model
  sentences = [
    'A man is playing a guitar.',
    'The weather is lovely today, so we went for a long walk in the park.',
    'Hi',
  ]
  ids, mask = minilm.tokenize(tokenizer, sentences)
  assert mask.sum(1).min() < ids.shape[1]  # Padding is exercised.
  got = np.asarray(module.apply({'params': params}, ids, mask))
  want = _numpy_minilm(ids, mask)
  assert got.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_minilm_paraphrases_are_closer(minilm_model):
  emb = minilm.encode(
    *minilm_model,
    [
      'A man is playing a guitar.',
      'Someone is playing an acoustic guitar.',
      'The stock market fell sharply on Monday.',
    ],
    batch_size=2,
  )
  assert emb.shape == (3, 384)
  paraphrase, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
  assert paraphrase > 0.6 and unrelated < 0.3


@pytest.mark.slow
def test_minilm_tokenizer_round_trip(minilm_model):
  tokenizer = minilm_model[2]
  sentence = 'the quick brown fox jumps over the lazy dog'
  encoding = tokenizer.encode(sentence)
  assert encoding.tokens[0] == '[CLS]' and encoding.tokens[-1] == '[SEP]'
  assert tokenizer.decode(encoding.ids) == sentence


# ---------------------------------------------------------------------------
# SmolLM2
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def smollm2_model():
  return smollm2.load_smollm2()


def _hf_order(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (back to rotate-half RoPE)."""
  out, d_in = w.shape
  return (
    w.reshape(n_heads, out // n_heads // 2, 2, d_in)
    .swapaxes(1, 2)
    .reshape(out, d_in)
  )


def _numpy_smollm2(ids: np.ndarray) -> np.ndarray:
  """Hugging Face-style Llama forward in float64, read straight from the GGUF.

  Uses rotate-half RoPE on un-permuted Q/K weights, i.e. the original HF
  layout, which must agree with the module's adjacent-pair RoPE on the
  stored llama.cpp layout.
  """
  reader = gguf.GGUFReader(smollm2.gguf_path())
  w = {
    t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
    for t in reader.tensors
  }
  n_heads, n_kv, theta, eps = 9, 3, 100000.0, 1e-5
  seq = len(ids)
  head_dim = 576 // n_heads

  def rms_norm(x, name):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w[name]

  inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  angles = np.arange(seq)[:, None] * inv_freq[None]
  cos, sin = (
    np.cos(np.concatenate([angles] * 2, -1)),
    np.sin(np.concatenate([angles] * 2, -1)),
  )

  def rope(x):  # (heads, seq, head_dim)
    half = head_dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin

  causal = np.triu(np.full((seq, seq), -np.inf), 1)
  x = w['token_embd.weight'][ids]
  for i in range(30):
    b = f'blk.{i}'
    h = rms_norm(x, f'{b}.attn_norm.weight')
    q = (h @ _hf_order(w[f'{b}.attn_q.weight'], n_heads).T).reshape(
      seq, n_heads, -1
    )
    k = (h @ _hf_order(w[f'{b}.attn_k.weight'], n_kv).T).reshape(seq, n_kv, -1)
    v = (h @ w[f'{b}.attn_v.weight'].T).reshape(seq, n_kv, -1)
    q, k, v = (
      rope(q.transpose(1, 0, 2)),
      rope(k.transpose(1, 0, 2)),
      v.transpose(1, 0, 2),
    )
    k, v = np.repeat(k, n_heads // n_kv, 0), np.repeat(v, n_heads // n_kv, 0)
    probs = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(head_dim) + causal)
    ctx = (probs @ v).transpose(1, 0, 2).reshape(seq, -1)
    x = x + ctx @ w[f'{b}.attn_output.weight'].T
    h = rms_norm(x, f'{b}.ffn_norm.weight')
    gate, up = h @ w[f'{b}.ffn_gate.weight'].T, h @ w[f'{b}.ffn_up.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f'{b}.ffn_down.weight'].T
  return rms_norm(x, 'output_norm.weight') @ w['token_embd.weight'].T


@pytest.mark.slow
def test_smollm2_config(smollm2_model):
  cfg = smollm2_model[0].config
  assert (
    cfg.hidden_size,
    cfg.num_layers,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.intermediate_size,
    cfg.vocab_size,
  ) == (576, 30, 9, 3, 1536, 49152)
  assert cfg.tie_embeddings


@pytest.mark.slow
def test_smollm2_params_match_init(smollm2_model):
  module, params, _ = smollm2_model
  assert _same_structure(module, (np.zeros((1, 4), np.int32),), params)


@pytest.mark.slow
def test_smollm2_matches_numpy_reference(smollm2_model):
  module, params, tokenizer = smollm2_model
  ids = np.array(tokenizer.encode('The capital of France is Paris, and').ids)
  assert 6 <= len(ids) <= 12
  got = np.asarray(module.apply({'params': params}, ids[None]))[0]
  want = _numpy_smollm2(ids)
  assert got.shape == (len(ids), 49152) and got.dtype == np.float32
  assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip(smollm2_model):
  tokenizer = smollm2_model[2]
  sentence = "Hello world! The year 2024 had 366 days; isn't that neat?"
  ids = tokenizer.encode(sentence).ids
  assert tokenizer.decode(ids) == sentence
  assert tokenizer.encode('<|im_start|>user').ids[0] == 1  # Control token.


@pytest.mark.slow
def test_smollm2_perplexity_on_prose(smollm2_model):
  module, params, tokenizer = smollm2_model
  ids = np.array(tokenizer.encode(text.prose_text()).ids)
  ppl = smollm2.perplexity(module, params, ids[:1024], window=512, batch_size=2)
  assert 3 < ppl < 40  # Measured ~14.2; a wrong RoPE pairing gives ~250.


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def test_prose_text_is_deterministic():
  prose = text.prose_text()
  assert prose == text.prose_text()
  assert len(prose) > 100_000


def test_split_tokens_disjoint_and_fixed():
  tokens = np.arange(1000)
  calib, evaluation = text.split_tokens(tokens, 300, 200)
  np.testing.assert_array_equal(calib, np.arange(300))
  np.testing.assert_array_equal(evaluation, np.arange(800, 1000))
  # The evaluation range does not depend on the calibration size.
  np.testing.assert_array_equal(
    text.split_tokens(tokens, 700, 200)[1], evaluation
  )
  with pytest.raises(ValueError):
    text.split_tokens(tokens, 801, 200)


def test_sentences_disjoint_and_fixed():
  calib, evaluation = text.split_sentences(64, 64)
  assert (calib, evaluation) == text.split_sentences(64, 64)
  assert len(calib) == len(evaluation) == 64
  assert not set(calib) & set(evaluation)
  assert text.sentences(3, offset=1) == calib[1:4]
  assert all(6 <= len(s.split()) <= 40 for s in calib + evaluation)
  assert text.num_sentences() > 1000


def test_read_text_file(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text('Grüße aus München.\n', encoding='utf-8')
  assert text.read_text_file(path) == 'Grüße aus München.\n'
