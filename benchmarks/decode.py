"""SmolLM2 decode tokens/s: FP32, Qwix PTQ int4, LQER packed (XLA, kernel).

One process, one chat prompt, greedy decoding of --new-tokens tokens with a
KV cache (`models.llama.Decoder`, as `lqer generate` runs it), --repeats
timed runs per variant after a warm-up, the variants interleaved; medians.
W4 g128; LQER is QERA rank 32 with bf16 factors, calibrated as `lqer eval`
calibrates (--calib-tokens of the bundled prose).

Then where a step's time goes, per variant: a jax.profiler trace of one
more generation, the step's XLA ops summed by kind (projections, the rest
of attention, the 49152 x 576 LM head, embedding, other)
against the wall time per step and XLA's run of the step program, and the
cost of dispatching a compiled no-op with the same arguments; and each
variant's bytes read per token (weights as stored plus the LM head)
against a read bandwidth measured in the same run.

    python benchmarks/decode.py [--new-tokens 64] [--repeats 5] [--json FILE]
"""

import argparse
import glob
import json
import re
import statistics
import sys
import tempfile
import time

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


def variants(task, calib_tokens):
  """{name: (module, params)}: FP32, Qwix PTQ int4 (its own provider and
  matmul), PTQ and LQER packed on the XLA path and on the kernel (where
  built), and LQER with its LM head quantized too (as `lqer generate
  --quantize-head`, calibrated on `calib_tokens`), packed on the kernel."""
  module, fp = task.module, task.params
  ptq_rules, _ = recipes.build_rules(fp, task.module_path, 4, 128, None, 'svd')
  ptq_model = qwix.quantize_model(module, qwix.PtqProvider(ptq_rules))
  abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), *task.example)
  ptq = qwix.quantize_params(fp, abstract['params'])
  out = {
    'FP32': (module, fp),
    'Qwix PTQ int4': (ptq_model, ptq),
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
      out[f'{name} int4 packed ({label})'] = (
        qwix.quantize_model(module, lqer.LqerProvider(r, int4_kernel=kernel)),
        lqer.pack_params(p),
      )
  if ffi.available():
    head_task = tasks.smollm2_task(n_calib=calib_tokens, quantize_head=True)
    rules = []
    _, params, secs = generate.quantize_task(
      head_task, provider_fn=lambda r: rules.append(r) or lqer.LqerProvider(r)
    )
    print(f'with the LM head: {secs:.1f} s', file=sys.stderr, flush=True)
    out['LQER int4 packed, LM head int4 (kernel)'] = (
      qwix.quantize_model(
        head_task.module, lqer.LqerProvider(rules[0], int4_kernel='ffi')
      ),
      lqer.pack_params(params),
    )
  return out


CATEGORIES = (
  ('LM head', re.compile(r'embed\.attend|lm_head')),
  ('embedding', re.compile(r'gather')),
  ('projections', re.compile(r'_proj')),
  ('attention', re.compile(r'/attn/')),
)


def _categories(hlo: str) -> dict:
  """{instruction name: category} of a compiled module's HLO text: the
  first of `CATEGORIES` whose pattern its line or its fused computation
  (op names, param names) matches, else 'other' (norms, activations,
  residuals, sampling)."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^%?([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      current = head.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  out = {}
  for lines in bodies.values():
    for line in lines:
      m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line)
      if not m:
        continue
      text = line + ''.join(
        '\n'.join(bodies.get(c, ()))
        for c in re.findall(r'calls=%([\w.\-]+)', line)
      )
      out[m.group(1)] = next(
        (name for name, pattern in CATEGORIES if pattern.search(text)),
        'other',
      )
  return out


def profile(decoder, params, prompt, new_tokens) -> dict:
  """Milliseconds per decode step from a jax.profiler trace of one
  generation: wall time, the compiled step's runs (XLA's ThunkExecutor
  events holding its ops) and its ops' time per `CATEGORIES` (summed over
  threads)."""
  categories = _categories(decoder._fn(params, 1).as_text())  # pylint: disable=protected-access
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    out = decoder.generate(params, prompt, new_tokens)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  ops, runs = {}, []
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        span = (event.start_ns, event.start_ns + event.duration_ns)
        if event.name == 'ThunkExecutor::Execute':
          runs.append(span)
        elif 'hlo_op' in stats and 'program_id' in stats:
          ops.setdefault(stats['program_id'], []).append(
            (stats['hlo_op'], span)
          )
  # The step's program: the one run most often (the prefill runs once).
  step_ops = max(ops.values(), key=len)
  ms = dict.fromkeys([name for name, _ in CATEGORIES] + ['other'], 0.0)
  step_runs = set()
  for name, (begin, end) in step_ops:
    ms[categories.get(name, 'other')] += (end - begin) / 1e6
    step_runs.update(r for r in runs if r[0] <= begin and end <= r[1])
  busy, last = 0, 0  # the union of the runs' spans
  for begin, end in sorted(step_runs):
    busy += max(0, end - max(begin, last))
    last = max(last, end)
  steps = out.decode_steps
  return dict(
    {k: v / steps for k, v in ms.items()},
    run=busy / 1e6 / steps,
    wall=out.decode_seconds / steps * 1e3,
  )


def dispatch_seconds(params, config, cache_len, repeats) -> float:
  """Median seconds of dispatching a compiled no-op of a decode step's
  arguments (params, token, cache, key) and waiting for it."""
  args = (
    params,
    jnp.zeros((1, 1), jnp.int32),
    llama.init_cache(config, 1, cache_len),
    jax.random.key(0),
  )
  noop = jax.jit(lambda p, t, c, k: t).lower(*args).compile()
  noop(*args).block_until_ready()
  return median_seconds(lambda: noop(*args).block_until_ready(), repeats)


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
  for name, (module, params) in variants(task, args.calib_tokens).items():
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
      decoder=decoder, params=params, decode=[], prefill=[], answer=answer
    )
  for _ in range(args.repeats):
    for run in runs.values():
      out = run['decoder'].generate(run['params'], prompt, args.new_tokens)
      run['decode'].append(out.decode_tokens_per_second)
      run['prefill'].append(out.prompt_tokens_per_second)
  bandwidth = read_bandwidth(args.repeats * 4)
  records = []
  for name, run in runs.items():
    blocks = {k: v for k, v in run['params'].items() if k.startswith('layers_')}
    head = run['params'].get('lm_head', task.params['embed'])
    spent = profile(run['decoder'], run['params'], prompt, args.new_tokens)
    spent['dispatch'] = 1e3 * dispatch_seconds(
      run['params'], config, cache_len, args.repeats * 4
    )
    tps = statistics.median(run['decode'])
    records.append(
      dict(
        variant=name,
        decode_tokens_per_s=tps,
        ms_per_token=1e3 / tps,
        prompt_tokens_per_s=statistics.median(run['prefill']),
        bytes_per_token=stored_bytes(blocks) + stored_bytes(head),
        profile_ms=spent,
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
  names = [name for name, _ in CATEGORIES] + ['other']
  print(
    '\nwhere a decode step goes (ms per step, from a jax.profiler trace of'
    ' one more generation): wall; XLA running the step program; its ops by'
    ' kind (summed over threads): the q/k/v/o and MLP projections, the'
    ' rest of attention (RoPE, cache update, scores, softmax), the LM'
    ' head, the embedding gather, other (norms, activations,'
    ' residuals, sampling); dispatch: a compiled no-op of the same'
    ' arguments, called and waited for (async dispatch overlaps it with'
    ' the previous step)\n'
  )
  print(f'| variant | wall | XLA run | {" | ".join(names)} | dispatch |')
  print('|---|' + '---|' * (len(names) + 3))
  for r in records:
    p = r['profile_ms']
    cells = ' | '.join(f'{p[k]:.2f}' for k in ['wall', 'run', *names])
    print(f'| {r["variant"]} | {cells} | {p["dispatch"]:.2f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        dict(bandwidth=bandwidth, prompt_tokens=len(prompt), rows=records),
        f,
        indent=1,
      )


if __name__ == '__main__':
  main()
