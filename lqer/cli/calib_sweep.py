"""`lqer eval --calib-tokens N [N ...]`: quality per calibration size, as
a table and a plot (`--plot FILE`)."""


def series(rows):
  """{(method, bits, rank): {calib: value}} of a calibration sweep's rows
  (FP has no calibration)."""
  out = {}
  for r in rows:
    if r.method != 'FP':
      out.setdefault((r.method, r.bits, r.rank), {})[r.calib] = r.value
  return out


def calib_table(rows) -> str:
  """Markdown: quality per calibration size, a row per configuration."""
  sizes = sorted({r.calib for r in rows if r.calib is not None})
  lines = [
    '| ' + ' | '.join(['method', 'bits', 'rank', *map(str, sizes)]) + ' |',
    '|' + '---|' * (3 + len(sizes)),
  ]
  for (method, bits, rank), values in series(rows).items():
    cells = [f'{values[n]:.4f}' if n in values else '-' for n in sizes]
    lines.append(
      f'| {method} | {bits} | {rank or "-"} | ' + ' | '.join(cells) + ' |'
    )
  return '\n'.join(lines)


def plot_calibration(rows, path):
  """Quality against calibration size (log x), one line per configuration,
  FP as a horizontal line."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for (method, bits, rank), values in series(rows).items():
    sizes = sorted(values)
    label = f'{method} W{bits}' + (f' r{rank}' if rank else '')
    ax.plot(sizes, [values[n] for n in sizes], marker='o', label=label)
  fp = [r.value for r in rows if r.method == 'FP']
  if fp:
    ax.axhline(fp[0], color='k', linestyle='--', label='FP')
  ax.set_xscale('log', base=2)
  ax.set_xlabel(
    f'calibration {"tokens" if rows[0].model == "smollm2" else "sentences"}'
  )
  ax.set_ylabel(rows[0].metric)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'saved {path}')
