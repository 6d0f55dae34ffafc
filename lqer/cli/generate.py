"""`lqer generate`: text from SmolLM2, quantized on the fly or loaded.

    lqer generate "What is the capital of France?" --bits 4 --method qera \\
        --rank 32 [--pack [--int4-kernel auto|ffi|xla]] [--fp] \\
        [--load OUT_DIR] [--max-new-tokens N] [--temperature T --top-k K]

quantizes the bundled SmolLM2-135M-Instruct as `lqer eval` does (same
calibration tokens, rules and solver), or loads an `lqer quantize` output
directory, then decodes with a KV cache (`models.llama.Decoder`): greedy by
default. The prompt goes through the model's chat template (ChatML, with
the template's default system message) unless --no-chat. The text goes to
stdout; compile seconds and prompt and decode tokens per second to stderr.
"""

import json
import math
import pathlib
import re
import sys
import time

import jax
import qwix

from lqer.checkpoints import streaming
from lqer.cli import common
from lqer.cli import quantize
from lqer.cli import tasks
from lqer.kernels import ffi
from lqer.providers.inference import LqerProvider
from lqer.quant import packing
from lqer.quant import recipes

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_RANK = 32
DEFAULT_METHOD = 'qera'
# Tokens that end an answer, where the tokenizer has them.
STOP_TOKENS = ('<|im_end|>', '<|endoftext|>')
CHATML_SYSTEM = re.compile(r'<\|im_start\|>system\n(.*?)<\|im_end\|>', re.S)


def add_parser(sub):
  """The `generate` subcommand's arguments."""
  g = sub.add_parser(
    'generate',
    help='decode text from SmolLM2 (quantized on the fly, float, or an'
    ' lqer quantize directory) with a KV cache',
  )
  g.add_argument('prompt', help='the user message (or raw text: --no-chat)')
  g.add_argument(
    '--max-new-tokens',
    type=int,
    default=DEFAULT_MAX_NEW_TOKENS,
    help=f'at most this many new tokens (default {DEFAULT_MAX_NEW_TOKENS})',
  )
  g.add_argument(
    '--temperature',
    type=float,
    default=0.0,
    help='sampling temperature (default 0: greedy)',
  )
  g.add_argument(
    '--top-k',
    type=int,
    default=0,
    help='with --temperature: sample among the k most likely (0: all)',
  )
  g.add_argument('--seed', type=int, default=0, help='sampling seed')
  g.add_argument(
    '--no-chat',
    dest='chat',
    action='store_false',
    help='feed the prompt as it is, without the chat template',
  )
  g.add_argument(
    '--fp', action='store_true', help='the float model, not quantized'
  )
  g.add_argument(
    '--load',
    help='a directory written by lqer quantize --out, instead of'
    ' quantizing the bundled SmolLM2',
  )
  common.add_head_argument(g)
  g.add_argument(
    '--bits', type=int, choices=common.WEIGHT_BITS, help='default 4'
  )
  g.add_argument(
    '--tile-size',
    type=int,
    help='per-group size (default 128; 0 = per-channel)',
  )
  g.add_argument(
    '--rank',
    type=int,
    help=f'default {DEFAULT_RANK}; 0: plain PTQ (no factors)',
  )
  g.add_argument(
    '--method',
    choices=['svd', 'l2qer', 'qera'],
    help=f'default {DEFAULT_METHOD}',
  )
  g.add_argument('--base', choices=['rtn', 'gptq', 'awq'], help='default rtn')
  g.add_argument(
    '--factor-bits',
    type=int,
    choices=sorted(common.FACTOR_QTYPES, reverse=True),
    help='A, B in bfloat16 (16, default) or int8 / int4',
  )
  g.add_argument(
    '--calib-tokens',
    type=int,
    help=f'calibration tokens (default {common.DEFAULT_CALIB_TOKENS})',
  )
  g.add_argument(
    '--pack',
    action='store_true',
    help='int4 weights packed two per byte (lqer.pack_params)',
  )
  g.add_argument(
    '--int4-kernel',
    choices=packing.KERNELS,
    help="with --pack: lqer's int4 CPU kernel ('ffi'), the XLA path"
    " ('xla') or the kernel where it is built ('auto', default)",
  )
  g.add_argument(
    '--compute-dtype',
    choices=sorted(common.COMPUTE_DTYPES),
    default='auto',
    help='quantized matmuls (LqerProvider compute_dtype; default auto)',
  )


# Flags that choose how the bundled model is quantized.
_QUANT_FLAGS = (
  'bits',
  'tile_size',
  'rank',
  'method',
  'base',
  'factor_bits',
  'calib_tokens',
  'quantize_head',
)


def _flag(name: str) -> str:
  return '--' + name.replace('_', '-')


def check_args(args) -> None:
  """Raises SystemExit naming the flag for arguments that cannot work,
  before any model loads."""
  if not args.prompt.strip():
    raise SystemExit('lqer generate: the prompt is empty')
  if args.max_new_tokens < 1:
    raise SystemExit(
      f'--max-new-tokens must be >= 1, got {args.max_new_tokens}'
    )
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise SystemExit(
      f'--temperature must be a finite number >= 0, got {args.temperature}'
    )
  if args.top_k < 0:
    raise SystemExit(f'--top-k must be >= 0, got {args.top_k}')
  if args.top_k and not args.temperature:
    raise SystemExit('--top-k samples; give --temperature > 0 with it')
  given = [
    _flag(f) for f in _QUANT_FLAGS if getattr(args, f) not in (None, False)
  ]
  if args.fp and args.load is not None:
    raise SystemExit('--fp and --load: give one model')
  if (args.fp or args.load is not None) and given:
    raise SystemExit(
      f'{", ".join(given)} quantize the bundled model; not with'
      f' {"--fp" if args.fp else "--load"}'
    )
  if args.fp and args.pack:
    raise SystemExit('--pack packs quantized weights; not with --fp')
  if args.int4_kernel is not None and not args.pack:
    raise SystemExit(
      '--int4-kernel chooses how packed weights multiply; give --pack'
    )
  if args.int4_kernel == 'ffi' and not ffi.available():
    raise SystemExit(f'--int4-kernel ffi: {ffi.unavailable_reason()}')
  if args.pack and args.bits not in (None, 4):
    raise SystemExit(f'--pack packs int4 weights; got --bits {args.bits}')
  if args.rank is not None and args.rank < 0:
    raise SystemExit(f'--rank must be >= 0 (0: plain PTQ), got {args.rank}')
  if args.tile_size is not None and args.tile_size < 0:
    raise SystemExit(f'--tile-size must be >= 0, got {args.tile_size}')
  if args.calib_tokens is not None and args.calib_tokens < 1:
    raise SystemExit(f'--calib-tokens must be >= 1, got {args.calib_tokens}')
  if args.load is not None:
    try:
      loadable = quantize.is_quantized_dir(args.load)
    except FileNotFoundError as e:
      raise SystemExit(str(e)) from e
    if not loadable:
      raise SystemExit(
        f'--load {args.load}: lqer generate reads directories written by'
        ' lqer quantize --out (an lqer.json beside the blocks)'
      )


def chat_prompt(message: str, template: str | None) -> str:
  """``message`` as a ChatML user turn and the assistant's opening, after
  the system message a ChatML ``template`` puts first by default (SmolLM2's
  names the assistant); None or a template without one: no system turn."""
  match = CHATML_SYSTEM.search(template or '')
  system = f'<|im_start|>system\n{match.group(1)}<|im_end|>\n' if match else ''
  return (
    f'{system}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n'
  )


def provider(rules, args) -> LqerProvider:
  """The inference provider the flags ask for."""
  return LqerProvider(
    rules,
    compute_dtype=common.COMPUTE_DTYPES[args.compute_dtype],
    int4_kernel=args.int4_kernel or 'auto',
  )


def bundled_template() -> str | None:
  """The chat template in the bundled SmolLM2's GGUF metadata (None: none)."""
  import gguf  # pylint: disable=g-import-not-at-top

  from models import smollm2  # pylint: disable=g-import-not-at-top

  field = gguf.GGUFReader(smollm2.gguf_path()).fields.get(
    'tokenizer.chat_template'
  )
  return None if field is None else field.contents()


def bundled_model(args):
  """(module, params, tokenizer, chat template) of the bundled SmolLM2:
  float (--fp), else quantized as `lqer eval` quantizes it."""
  from models import smollm2  # pylint: disable=g-import-not-at-top

  template = bundled_template()
  if args.fp:
    module, params, tokenizer = smollm2.load_smollm2()
    return module, params, tokenizer, template
  task = tasks.smollm2_task(
    n_calib=args.calib_tokens or common.DEFAULT_CALIB_TOKENS,
    quantize_head=args.quantize_head,
  )
  model, params, secs = quantize_task(
    task,
    bits=args.bits or 4,
    tile_size=128 if args.tile_size is None else args.tile_size,
    rank=DEFAULT_RANK if args.rank is None else args.rank,
    method=args.method or DEFAULT_METHOD,
    base=args.base or 'rtn',
    factor_bits=args.factor_bits or 16,
    provider_fn=lambda rules: provider(rules, args),
  )
  print(f'quantized in {secs:.1f} s', file=sys.stderr, flush=True)
  tokenizer = smollm2.load_smollm2()[2]
  return model, params, tokenizer, template


def quantize_task(
  task,
  bits=4,
  tile_size=128,
  rank=DEFAULT_RANK,
  method=DEFAULT_METHOD,
  base='rtn',
  factor_bits=16,
  provider_fn=LqerProvider,
):
  """(model, params, seconds) of `task` quantized as `lqer eval`'s row of
  these settings (rank 0: its PTQ row): the same rules, calibration
  statistics and solver; the model wrapped with ``provider_fn(rules)``."""
  rules_for = lambda rank, method, **kw: recipes.build_rules(
    task.params, task.module_path, bits, tile_size or None, rank, method, **kw
  )[0]
  factor_qtype = common.FACTOR_QTYPES[factor_bits]
  rules = (
    rules_for(rank, method, factor_qtype=factor_qtype)
    if rank
    else rules_for(None, 'svd', factor_qtype=factor_qtype)
  )
  stats = tasks.calibration_statistics(task, rules_for(1, 'qera'))
  _, params, secs = tasks.quantize(task, rules, stats, base)
  return qwix.quantize_model(task.module, provider_fn(rules)), params, secs


def loaded_model(args):
  """(module, params, tokenizer, chat template) of an `lqer quantize`
  directory, its tokenizer from the source checkpoint it names."""
  from models import llama  # pylint: disable=g-import-not-at-top
  from models.hf_checkpoint import CheckpointDir  # pylint: disable=g-import-not-at-top

  meta = streaming.read_metadata(args.load)
  source = pathlib.Path(meta['source'])
  if not source.is_dir():
    raise SystemExit(
      f'--load {args.load}: its lqer.json names the source {source}, which'
      ' is gone; lqer generate takes the tokenizer from there'
    )
  model, params, meta = streaming.load_quantized(args.load)
  config = model.config
  rules = streaming.Settings(**meta['settings']).rules(config)
  module = qwix.quantize_model(
    llama.LlamaForCausalLM(config), provider(rules, args)
  )
  tokenizer = CheckpointDir(source).tokenizer()
  template = None
  tokenizer_config = source / 'tokenizer_config.json'
  if tokenizer_config.is_file():
    template = json.loads(tokenizer_config.read_text()).get('chat_template')
  return module, params, tokenizer, template


def describe(args) -> str:
  """The model the flags choose, in a few words."""
  if args.fp:
    return 'SmolLM2-135M-Instruct float32'
  if args.load is not None:
    settings = streaming.read_metadata(args.load)['settings']
    name = args.load
  else:
    settings = dict(
      bits=args.bits or 4,
      tile_size=128 if args.tile_size is None else args.tile_size,
      rank=DEFAULT_RANK if args.rank is None else args.rank,
      method=args.method or DEFAULT_METHOD,
      base=args.base or 'rtn',
    )
    name = 'SmolLM2-135M-Instruct'
  method = (
    common.METHOD_LABELS[settings['method']] + f' r{settings["rank"]}'
    if settings['rank']
    else 'PTQ'
  )
  desc = (
    f'{name} W{settings["bits"]} g{settings["tile_size"] or "-"}'
    f' {settings["base"]} {method}'
  )
  if args.load is None and args.quantize_head:
    desc += ', LM head quantized'
  else:
    desc += ', float LM head'

  if args.pack:
    kernel = packing.resolve_kernel(args.int4_kernel or 'auto')
    desc += f', packed ({"int4 kernel" if kernel == "ffi" else "XLA path"})'
  return desc


def stop_ids(tokenizer) -> tuple[int, ...]:
  """Ids of `STOP_TOKENS` the tokenizer has."""
  ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
  return tuple(i for i in ids if i is not None)


def generate_command(args) -> str:
  """Runs `lqer generate`: prints the text, returns it."""
  check_args(args)
  start = time.perf_counter()
  if args.load is not None:
    module, params, tokenizer, template = loaded_model(args)
  else:
    module, params, tokenizer, template = bundled_model(args)
  if args.pack:
    params = packing.pack_params(params)
  load_secs = time.perf_counter() - start
  from models import llama  # pylint: disable=g-import-not-at-top

  text = chat_prompt(args.prompt, template) if args.chat else args.prompt
  prompt = tokenizer.encode(text).ids
  config = module.config
  if len(prompt) + args.max_new_tokens > config.max_seq_len:
    raise SystemExit(
      f'{len(prompt)} prompt tokens + --max-new-tokens'
      f" {args.max_new_tokens} exceed the model's {config.max_seq_len}"
      ' positions'
    )
  decoder = llama.Decoder(
    module,
    config,
    len(prompt) + args.max_new_tokens,
    args.temperature,
    args.top_k,
  )
  compile_secs = decoder.compile(params, len(prompt))
  out = decoder.generate(
    params,
    prompt,
    args.max_new_tokens,
    jax.random.key(args.seed),
    stop_ids(tokenizer),
  )
  answer = tokenizer.decode(out.tokens)
  print(answer, flush=True)
  print(
    f'{describe(args)}: ready in {load_secs:.1f} s,'
    f' compiled in {compile_secs:.1f} s; prompt: {out.prompt_tokens} tokens'
    f' at {out.prompt_tokens_per_second:.1f} tokens/s; decode:'
    f' {out.decode_steps} steps at {out.decode_tokens_per_second:.1f}'
    ' tokens/s',
    file=sys.stderr,
    flush=True,
  )
  return answer
