"""Which error dominates: SVDQuant's bound terms, per method, from the report.

Quantizes a bundled model with each method at W4 and 4- or 8-bit
activations (no evaluation pass) and prints `lqer.report`'s two terms of
the bound on ||X W - Q(X) Q(W)||, over ||X|| ||W||, on the calibration
sample: the weight's (W-term) and the activation's (X-term), averaged over
the quantized weights by size, and the number of weights whose X-term is
the larger.

    python benchmarks/bound_terms.py --model smollm2 --act-bits 4
"""

import smooth_alpha  # benchmarks/ (the script's directory)

from lqer.cli import common
from lqer.cli import tasks
from lqer.offline import report as reporting
from lqer.quant import recipes


def main():
  p = smooth_alpha.parser(__doc__)
  p.add_argument(
    '--methods',
    nargs='+',
    default=['ptq', 'qera', 'smoothquant', 'svdquant', 'svdquant-qera'],
  )
  args = p.parse_args()
  task = tasks.TASKS[args.model]()
  alpha = common.DEFAULT_SMOOTH_ALPHA[task.name, args.act_bits]
  build = lambda **kw: recipes.build_rules(
    task.params,
    task.module_path,
    args.bits,
    args.tile_size,
    act_bits=args.act_bits,
    smooth_alpha=alpha,
    **kw,
  )[0]
  rules = build(rank=1, method='qera')
  stats = tasks.calibration_statistics(task, rules)
  print(
    f'# {task.name} W{args.bits}A{args.act_bits} g{args.tile_size},'
    f' rank {args.rank}, smooth_alpha {alpha}; bound terms over'
    ' ||X|| ||W||, size-weighted mean over weights'
  )
  print('| method | W-term | X-term | weights with X-term > W-term |')
  print('|---|---|---|---|')
  for i, method in enumerate(args.methods):
    kw = (
      dict(rank=None, method='svd')
      if method == 'ptq'
      else recipes.method_rule_kw(method, args.rank, act_bits=args.act_bits)
    )
    rules = build(**kw)
    _, params, _ = tasks.quantize(task, rules, stats)
    rep = reporting.report(task.params, params, stats, rules)
    total = rep.total()
    if i == 0:  # every method's base row is plain PTQ of W
      x_won = sum(l.bound_act_base > l.bound_weight_base for l in rep.layers)
      print(
        f'| PTQ (base) | {total["bound_weight_base"]:.4f} |'
        f' {total["bound_act_base"]:.4f} | {x_won} / {len(rep.layers)} |'
      )
    if method != 'ptq':
      x_won = sum(l.bound_act > l.bound_weight for l in rep.layers)
      print(
        f'| {common.METHOD_LABELS[method]} |'
        f' {total["bound_weight"]:.4f} | {total["bound_act"]:.4f} |'
        f' {x_won} / {len(rep.layers)} |',
        flush=True,
      )


if __name__ == '__main__':
  main()
