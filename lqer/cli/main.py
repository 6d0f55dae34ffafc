"""The `lqer` command line (also `python -m lqer ...`).

    lqer eval       quantize a bundled model every way asked, print a table
    lqer finetune   QLoRA from zero vs from the reconstruction
    lqer generate   decode text with a KV cache, tokens/s on stderr
    lqer quantize   quantize a checkpoint directory block by block

Each command's module (`lqer.cli.eval`, `.finetune`, `.quantize`) builds its
own subparser and runs it.
"""

import argparse

from lqer.cli import eval as eval_cli
from lqer.cli import finetune
from lqer.cli import generate
from lqer.cli import quantize

# (subcommand, its module's add_parser, its command function)
COMMANDS = {
  'eval': (eval_cli.add_parser, eval_cli.eval_command),
  'finetune': (finetune.add_parser, finetune.finetune_command),
  'generate': (generate.add_parser, generate.generate_command),
  'quantize': (quantize.add_parser, quantize.quantize_command),
}


def parser() -> argparse.ArgumentParser:
  """The `lqer` parser, one subparser per command."""
  p = argparse.ArgumentParser(
    prog='lqer',
    description=__doc__,
    formatter_class=argparse.RawTextHelpFormatter,
  )
  sub = p.add_subparsers(dest='command', required=True)
  for add_parser, _ in COMMANDS.values():
    add_parser(sub)
  return p


def main(argv=None) -> None:
  """Parses `argv` (default: sys.argv) and runs the command (the console
  script passes the result to sys.exit: None is success)."""
  args = parser().parse_args(argv)
  COMMANDS[args.command][1](args)


if __name__ == '__main__':
  main()
