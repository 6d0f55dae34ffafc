"""SmolLM2 decode tokens/s: FP32, Qwix PTQ int4, LQER packed (XLA, kernel).

One process, one chat prompt, greedy decoding of --new-tokens tokens with a
KV cache (`models.llama.Decoder`, as `lqer generate` runs it), --repeats
timed runs per variant after a warm-up, the variants interleaved; medians.
W4 g128; LQER is QERA rank 32 with bf16 factors, calibrated as `lqer eval`
calibrates (--calib-tokens of the bundled prose).

Then where a step's time goes, per variant (medians of jitted pieces on one
token): dispatching the jitted step with its params and cache (a no-op of
the same arguments), the decoder blocks on one token without the cache
(their matmuls, norms and activations), the final norm and the tied
49152 x 576 float32 LM head, and the rest (attention over the cache, its
update, sampling); and each variant's bytes read per token (weights as
stored plus the LM head) against a read bandwidth measured in the same run.

    python benchmarks/decode.py [--new-tokens 64] [--repeats 5] [--json FILE]
"""

import argparse
import json
import statistics
import sys
import time

from flax import linen as nn
import jax
import jax.numpy as jnp
import qwix

import lqer
from lqer.cli import generate
from lqer.cli import tasks
from lqer.kernels import ffi
from lqer.quant import recipes
from models import llama
from models import smollm2

PROMPT = 'What is the capital of France? Answer in one sentence.'


def stored_bytes(tree) -> int:
  """Bytes as stored: bits of each leaf's dtype (int4 = 4 bits)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    name = jnp.dtype(leaf.dtype).name
    bits = (
      4 if name in ('int4', 'uint4') else jnp.dtype(leaf.dtype).itemsize * 8
    )
    total += leaf.size * bits // 8
  return total


def read_bandwidth(repeats: int, mb: int = 512) -> float:
  """Bytes per second of a jitted sum over a float32 array of `mb` MB
  (median of `repeats`)."""
  x = jnp.ones((mb << 18,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return x.nbytes / median_seconds(
    lambda: total(x).block_until_ready(), repeats
  )


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def variants(task):
  """{name: (module, params, provider or None)}: FP32, Qwix PTQ int4 (its
  own provider and matmul), and PTQ and LQER packed on the XLA path and on
  the kernel (where built)."""
  module, fp = task.module, task.params
  ptq_rules, _ = recipes.build_rules(fp, task.module_path, 4, 128, None, 'svd')
  qwix_ptq = qwix.PtqProvider(ptq_rules)
  ptq_model = qwix.quantize_model(module, qwix_ptq)
  abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), *task.example)
  ptq = qwix.quantize_params(fp, abstract['params'])
  out = {
    'FP32': (module, fp, None),
    'Qwix PTQ int4': (ptq_model, ptq, qwix_ptq),
  }
  rules = []
  _, params, secs = generate.quantize_task(
    task, provider_fn=lambda r: rules.append(r) or lqer.LqerProvider(r)
  )
  print(f'QERA r32 quantized in {secs:.1f} s', file=sys.stderr, flush=True)
  if not ffi.available():
    print(f'no kernel rows: {ffi.unavailable_reason()}', file=sys.stderr)
  for kernel in ['xla'] + (['ffi'] if ffi.available() else []):
    label = 'kernel' if kernel == 'ffi' else 'XLA'
    for name, p, r in (('PTQ', ptq, ptq_rules), ('LQER', params, rules[0])):
      provider = lqer.LqerProvider(r, int4_kernel=kernel)
      out[f'{name} int4 packed ({label})'] = (
        qwix.quantize_model(module, provider),
        lqer.pack_params(p),
        provider,
      )
  return out


def pieces(config, module, params, provider, cache_len, repeats):
  """Median seconds of the pieces of one decode step (see the module
  docstring): dispatch, blocks, head."""
  token = jnp.zeros((1, 1), jnp.int32)
  cache = llama.init_cache(config, 1, cache_len)
  key = jax.random.key(0)
  noop = jax.jit(lambda p, t, c, k: t)
  x = jnp.ones((1, 1, config.hidden_size), jnp.float32)
  blocks = []
  for i in range(config.num_layers):
    block = llama.SingleBlock(config, layer=i)
    if provider is not None:
      block = qwix.quantize_model(block, provider)
    blocks.append(block)

  @jax.jit
  def run_blocks(params, x):
    for i, block in enumerate(blocks):
      name = f'layers_{i}'
      x = block.apply({'params': {name: params[name]}}, x)
    return x

  norm = nn.RMSNorm(config.rms_eps)
  head = jax.jit(
    lambda p, x: llama.output_logits(p, norm.apply({'params': p['norm']}, x))
  )
  fns = {
    'dispatch': lambda: noop(params, token, cache, key).block_until_ready(),
    'blocks': lambda: run_blocks(params, x).block_until_ready(),
    'head': lambda: head(params, x).block_until_ready(),
  }
  for fn in fns.values():
    fn()
  return {k: median_seconds(fn, repeats * 4) for k, fn in fns.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--new-tokens', type=int, default=64)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--calib-tokens', type=int, default=8192)
  p.add_argument('--json')
  args = p.parse_args()
  if args.new_tokens < 2 or args.repeats < 1 or args.calib_tokens < 1:
    raise SystemExit(
      '--new-tokens must be >= 2, --repeats and --calib-tokens >= 1'
    )
  print(f'# python benchmarks/decode.py {" ".join(sys.argv[1:])}')
  print(f'devices: {jax.devices()}')
  task = tasks.smollm2_task(n_calib=args.calib_tokens)
  config = task.module.config
  tokenizer = smollm2.load_smollm2()[2]
  template = generate.bundled_template()
  prompt = tokenizer.encode(generate.chat_prompt(PROMPT, template)).ids
  cache_len = len(prompt) + args.new_tokens
  runs = {}
  for name, (module, params, provider) in variants(task).items():
    decoder = llama.Decoder(module, config, cache_len)
    secs = decoder.compile(params, len(prompt))
    out = decoder.generate(params, prompt, args.new_tokens)  # warm-up
    stop = generate.stop_ids(tokenizer)
    first_stop = next((i for i, t in enumerate(out.tokens) if t in stop), None)
    answer = tokenizer.decode(out.tokens[:first_stop])
    print(
      f'{name}: compiled in {secs:.1f} s; {answer!r}',
      file=sys.stderr,
      flush=True,
    )
    runs[name] = dict(
      decoder=decoder, params=params, module=module, provider=provider
    )
    runs[name].update(decode=[], prefill=[], answer=answer)
  for _ in range(args.repeats):
    for run in runs.values():
      out = run['decoder'].generate(run['params'], prompt, args.new_tokens)
      run['decode'].append(out.decode_tokens_per_second)
      run['prefill'].append(out.prompt_tokens_per_second)
  bandwidth = read_bandwidth(args.repeats * 4)
  head_bytes = stored_bytes(task.params['embed'])
  records = []
  for name, run in runs.items():
    blocks = {k: v for k, v in run['params'].items() if k.startswith('layers_')}
    piece = pieces(
      config,
      run['module'],
      run['params'],
      run['provider'],
      cache_len,
      args.repeats,
    )
    tps = statistics.median(run['decode'])
    records.append(
      dict(
        variant=name,
        decode_tokens_per_s=tps,
        ms_per_token=1e3 / tps,
        prompt_tokens_per_s=statistics.median(run['prefill']),
        bytes_per_token=stored_bytes(blocks) + head_bytes,
        **{f'{k}_ms': v * 1e3 for k, v in piece.items()},
        answer=run['answer'],
      )
    )
  fp = records[0]['decode_tokens_per_s']
  print(
    f'\nprompt {len(prompt)} tokens, {args.new_tokens} new tokens (greedy),'
    f' medians of {args.repeats} runs; read bandwidth'
    f' {bandwidth / 1e9:.1f} GB/s\n'
  )
  print(
    '| variant | decode tokens/s | ms/token | vs FP32 | prompt tokens/s |'
    ' MB read/token | share of bandwidth |'
  )
  print('|---|---|---|---|---|---|---|')
  for r in records:
    share = r['bytes_per_token'] * r['decode_tokens_per_s'] / bandwidth
    print(
      f'| {r["variant"]} | {r["decode_tokens_per_s"]:.1f} |'
      f' {r["ms_per_token"]:.2f} | {r["decode_tokens_per_s"] / fp:.2f}x |'
      f' {r["prompt_tokens_per_s"]:.0f} | {r["bytes_per_token"] / 1e6:.1f} |'
      f' {share * 100:.0f} % |'
    )
  print(
    f'\nwhere a step goes (ms): blocks = the {config.num_layers} decoder'
    ' blocks on one token'
    ' without the cache; head = final norm + tied LM head (float32);'
    ' rest = step - blocks - head (attention over the cache, its update,'
    ' embedding, sampling); dispatch = a jitted no-op of the same'
    ' arguments (overlapped with the previous step by async dispatch)\n'
  )
  print('| variant | step | blocks | head | rest | dispatch |')
  print('|---|---|---|---|---|---|')
  for r in records:
    rest = r['ms_per_token'] - r['blocks_ms'] - r['head_ms']
    print(
      f'| {r["variant"]} | {r["ms_per_token"]:.2f} | {r["blocks_ms"]:.2f} |'
      f' {r["head_ms"]:.2f} | {rest:.2f} | {r["dispatch_ms"]:.2f} |'
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        dict(bandwidth=bandwidth, prompt_tokens=len(prompt), rows=records),
        f,
        indent=1,
      )


if __name__ == '__main__':
  main()
