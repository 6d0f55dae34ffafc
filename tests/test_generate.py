"""KV-cache decoding (`models.llama`) and `lqer generate`."""

import jax
import numpy as np
import pytest
import qwix

import lqer
from lqer import LqerProvider
from lqer import lqer_quantize_params
from lqer.checkpoints import streaming
from lqer.cli import generate
from lqer.cli import main as cli
from lqer.cli import tasks
from lqer.kernels import ffi
from lqer.quant import recipes
from models import hf_checkpoint
from models import llama
from tests import test_streaming


def _config(**kw):
  base = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=10000.0,
    rms_eps=1e-5,
    max_seq_len=64,
  )
  return llama.LlamaConfig(**(base | kw))


def _ids(length, vocab=97, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab, (1, length)).astype(np.int32)


def _assert_cache_matches_forward(module, params, config, ids, prefill):
  """Prefill of ids[:, :prefill], then one token at a time: each step's
  logits equal the full forward's at that position (float32, 1e-5 of the
  logits' scale). Returns the full forward's logits."""
  apply = jax.jit(lambda p, x, c=None: module.apply({'params': p}, x, c))
  full = np.asarray(apply(params, ids))
  tol = 1e-5 * np.abs(full).max()
  cache = llama.init_cache(config, 1, ids.shape[1] + 3)
  logits, cache = apply(params, ids[:, :prefill], cache)
  assert logits.shape == (1, 1, config.vocab_size)
  np.testing.assert_allclose(logits[:, 0], full[:, prefill - 1], atol=tol)
  for t in range(prefill, ids.shape[1]):
    logits, cache = apply(params, ids[:, t : t + 1], cache)
    assert int(cache.index) == t + 1
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=tol)
  return full


@pytest.mark.parametrize(
  'config',
  [
    _config(),  # llama.cpp's adjacent RoPE pairs, tied embeddings, GQA
    _config(  # Hugging Face's halves, llama3 scaling, biases, untied head
      rope_pairs='halves',
      rope_scaling=test_streaming.LLAMA3_SCALING,
      attention_bias=True,
      tie_embeddings=False,
      num_kv_heads=4,
    ),
  ],
)
def test_cache_decode_equals_full_forward(config):
  module = llama.LlamaForCausalLM(config)
  ids = _ids(12)
  params = test_streaming.tiny_params(config)
  # The cache path reads the same params: init with a cache builds the
  # same tree.
  with_cache = module.init(
    jax.random.key(0), ids[:, :1], llama.init_cache(config, 1, 4)
  )['params']
  assert jax.tree.structure(with_cache) == jax.tree.structure(params)
  _assert_cache_matches_forward(module, params, config, ids, prefill=5)


def test_cache_decode_runs_the_quantized_matmuls():
  """Under LqerProvider (W4 g32 LQER rank 4) the cache path multiplies the
  same quantized weights as the full forward: equal logits, both far from
  the float model's."""
  config = _config(hidden_size=64, intermediate_size=128)
  fp_module = llama.LlamaForCausalLM(config)
  params = test_streaming.tiny_params(config)
  rules, _ = recipes.build_rules(
    params, r'layers_\d+/(attn|mlp)/.*', 4, 32, 4, 'svd'
  )
  module = qwix.quantize_model(fp_module, LqerProvider(rules))
  ids = _ids(12)
  abstract = jax.eval_shape(module.init, jax.random.key(0), ids[:, :1])
  qparams = lqer_quantize_params(params, abstract['params'])
  q = _assert_cache_matches_forward(module, qparams, config, ids, prefill=4)
  fp = jax.jit(fp_module.apply)({'params': params}, ids)
  assert np.abs(fp - q).max() > 1e-3 * np.abs(fp).max()


@pytest.mark.parametrize('kernel', ['xla', 'ffi'])
def test_untied_head_is_quantized_packed_and_decodes(kernel):
  """`--quantize-head`: `untie_head` gives the tied model's logits; the
  rules then match lm_head as a projection, which packs to int4 and decodes
  with the cache as the full forward does, on both matmul paths."""
  if kernel == 'ffi' and not ffi.available():
    pytest.skip(ffi.unavailable_reason())
  config = _config(hidden_size=64, intermediate_size=128, vocab_size=256)
  tied = llama.LlamaForCausalLM(config)
  params = test_streaming.tiny_params(config)
  module, untied = llama.untie_head(tied, params)
  assert not module.config.tie_embeddings
  assert untied['lm_head']['kernel'].shape == (64, 256)
  assert 'lm_head' not in params  # the caller's tree is left as it was
  ids = _ids(12)
  np.testing.assert_allclose(
    module.apply({'params': untied}, ids),
    tied.apply({'params': params}, ids),
    rtol=1e-5,
    atol=1e-5,
  )
  assert llama.untie_head(module, untied) == (module, untied)
  rules, _ = recipes.build_rules(
    untied, tasks.SMOLLM2_PATHS + '|lm_head', 4, 32, 4, 'svd'
  )
  qmodule = qwix.quantize_model(module, LqerProvider(rules, int4_kernel=kernel))
  abstract = jax.eval_shape(qmodule.init, jax.random.key(0), ids[:, :1])
  packed = lqer.pack_params(lqer_quantize_params(untied, abstract['params']))
  head = packed['lm_head']['kernel']
  assert isinstance(head.array, lqer.PackedInt4), type(head.array)
  q = _assert_cache_matches_forward(qmodule, packed, module.config, ids, 4)
  fp = np.asarray(module.apply({'params': untied}, ids))
  assert np.abs(fp - q).max() > 1e-3 * np.abs(fp).max()


def _greedy_reference(module, params, prompt, n):
  """n greedy tokens by full forwards (no cache) over the growing sequence,
  zero-padded to one length (causal: the padding is never attended)."""
  forward = jax.jit(lambda p, x: module.apply({'params': p}, x))
  seq = np.zeros((1, len(prompt) + n), np.int32)
  seq[0, : len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    seq[0, t] = int(np.argmax(forward(params, seq)[0, t - 1]))
  return seq[0, len(prompt) :].tolist()


def test_decoder_greedy_sampling_and_stop():
  config = _config()
  module = llama.LlamaForCausalLM(config)
  params = test_streaming.tiny_params(config, seed=3)
  prompt = _ids(5, seed=1)[0]
  want = _greedy_reference(module, params, prompt, 8)
  decoder = llama.Decoder(module, config, 16)
  out = decoder.generate(params, prompt, 8)
  assert out.tokens == want
  assert (out.prompt_tokens, out.decode_steps) == (5, 7)
  # A stop token ends the answer before it (and is not returned).
  stopped = decoder.generate(params, prompt, 8, stop_ids=(want[3],))
  assert stopped.tokens == want[: want.index(want[3])]
  # Sampling: reproducible by key; top-k 1 is greedy.
  sampler = llama.Decoder(module, config, 16, temperature=1.0)
  draws = [
    sampler.generate(params, prompt, 8, jax.random.key(s)).tokens
    for s in (0, 0, 1)
  ]
  assert draws[0] == draws[1] != draws[2]
  logits = jax.random.normal(jax.random.key(0), (64, 97))
  keys = jax.random.split(jax.random.key(1), 64)
  top1 = jax.vmap(lambda l, k: llama.sample(l[None], k, 2.0, 1))(logits, keys)
  np.testing.assert_array_equal(top1[:, 0], np.argmax(logits, -1))
  top3 = jax.vmap(lambda l, k: llama.sample(l[None], k, 5.0, 3))(logits, keys)
  ranks = np.argsort(-np.asarray(logits), -1)
  assert all(t in r[:3] for t, r in zip(np.asarray(top3)[:, 0], ranks))
  assert len(set(np.asarray(top3)[:, 0] == ranks[:, 0])) == 2  # not greedy
  with pytest.raises(ValueError, match='do not fit the cache'):
    decoder.generate(params, prompt, 12)


@pytest.fixture(scope='module')
def quantized_dir(tmp_path_factory):
  """A 2-block tiny checkpoint (byte tokenizer) through lqer quantize."""
  root = tmp_path_factory.mktemp('generate')
  test_streaming.write_tiny(
    root / 'src', test_streaming.tiny_config(num_layers=2)
  )
  streaming.quantize_checkpoint(
    hf_checkpoint.CheckpointDir(root / 'src'),
    root / 'out',
    test_streaming.SETTINGS,
    test_streaming._calib_ids(4, 16),
    progress=False,
  )
  return root / 'out'


def _run(argv):
  return generate.generate_command(cli.parser().parse_args(argv))


@pytest.mark.parametrize(
  'kernel',
  [
    None,
    'xla',
    pytest.param(
      'ffi',
      marks=pytest.mark.skipif(
        not ffi.available(), reason='int4 kernel not built'
      ),
    ),
  ],
)
def test_generate_cli_load_end_to_end(quantized_dir, kernel, capsys):
  """lqer generate --load: the greedy answer of the full forward over the
  growing sequence (unpacked, or packed on either int4 path), the text on
  stdout, tokens/s on stderr."""
  argv = ['generate', 'hi', '--load', str(quantized_dir)]
  argv += ['--max-new-tokens', '6', '--compute-dtype', 'float32']
  if kernel:
    argv += ['--pack', '--int4-kernel', kernel]
  text = _run(argv)
  out, err = capsys.readouterr()
  assert out == text + '\n'
  assert 'prompt: ' in err and 'tokens/s' in err
  model, params, _ = streaming.load_quantized(quantized_dir)
  source = hf_checkpoint.CheckpointDir(
    streaming.read_metadata(quantized_dir)['source']
  )
  tokenizer = source.tokenizer()
  prompt = tokenizer.encode(generate.chat_prompt('hi', None)).ids
  want = _greedy_reference(model, params, prompt, 6)
  assert text == tokenizer.decode(want)


def test_chat_prompt_keeps_the_templates_system_message():
  template = (
    "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
  )
  assert generate.chat_prompt('Hi?', template) == (
    '<|im_start|>system\nYou are SmolLM<|im_end|>\n'
    '<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n'
  )
  assert generate.chat_prompt('Hi?', None).startswith('<|im_start|>user\n')


@pytest.mark.parametrize(
  'argv, message',
  [
    (['  '], 'prompt is empty'),
    (['hi', '--max-new-tokens', '0'], '--max-new-tokens'),
    (['hi', '--temperature', '-1'], '--temperature'),
    (['hi', '--temperature', 'nan'], '--temperature'),
    (['hi', '--top-k', '5'], '--top-k samples'),
    (['hi', '--top-k', '-1', '--temperature', '1'], '--top-k'),
    (['hi', '--fp', '--load', 'x'], '--fp and --load'),
    (['hi', '--fp', '--rank', '8'], '--rank'),
    (['hi', '--load', 'x', '--bits', '4'], '--bits'),
    (['hi', '--fp', '--pack'], '--pack'),
    (['hi', '--int4-kernel', 'xla'], '--pack'),
    (['hi', '--pack', '--bits', '8'], '--bits 8'),
    (['hi', '--rank', '-1'], '--rank'),
    (['hi', '--tile-size', '-1'], '--tile-size'),
    (['hi', '--calib-tokens', '0'], '--calib-tokens'),
    (['hi', '--load', '/no/such/dir'], '--load /no/such/dir'),
    (['hi', '--fp', '--quantize-head'], '--quantize-head'),
    (['hi', '--load', 'x', '--quantize-head'], '--quantize-head'),
  ],
)
def test_bad_arguments_fail_before_any_model_loads(argv, message, monkeypatch):
  def no_model(*args, **kwargs):
    raise AssertionError('a model was loaded')

  from models import smollm2  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(smollm2, 'load_smollm2', no_model)
  monkeypatch.setitem(tasks.TASKS, 'smollm2', no_model)
  monkeypatch.setattr(tasks, 'smollm2_task', no_model)
  with pytest.raises(SystemExit, match=message):
    cli.main(['generate', *argv])


def test_int4_kernel_ffi_refused_where_it_is_not_built(monkeypatch):
  monkeypatch.setattr(ffi, 'available', lambda: False)
  monkeypatch.setattr(ffi, 'unavailable_reason', lambda: 'no compiler')
  with pytest.raises(SystemExit, match='--int4-kernel ffi: no compiler'):
    cli.main(['generate', 'hi', '--pack', '--int4-kernel', 'ffi'])


def test_load_of_an_eval_save_directory_is_refused(tmp_path):
  (tmp_path / 'w4_g128_qera_r32').mkdir()
  (tmp_path / 'w4_g128_qera_r32' / 'params.safetensors').write_bytes(b'')
  with pytest.raises(SystemExit, match='lqer quantize --out'):
    cli.main(['generate', 'hi', '--load', str(tmp_path)])


@pytest.mark.slow
def test_smollm2_fp_answers(capsys):
  """The bundled SmolLM2-135M-Instruct, float, greedy through its chat
  template: a few tokens of a sensible answer."""
  text = _run(
    [
      'generate',
      'What is the capital of France? Answer in one sentence.',
      '--fp',
      '--max-new-tokens',
      '12',
    ]
  )
  assert 'Paris' in text
  assert 'decode: ' in capsys.readouterr().err


def test_eval_quantize_head_is_for_smollm2(monkeypatch):
  def load(*args, **kwargs):
    raise AssertionError('the model was loaded')

  monkeypatch.setitem(tasks.TASKS, 'minilm', load)
  with pytest.raises(SystemExit, match='--quantize-head unties SmolLM2'):
    cli.main(['eval', '--model', 'minilm', '--quantize-head'])
