"""Plot a sweep's summary: one bar chart per headline figure, one bar per run.

  python -m launch.plot --summary=runs/sweep/summary.jsonl --out=runs/sweep/summary.png
"""

import json
import math
import pathlib
import sys

import matplotlib

matplotlib.use('Agg')  # Files only; no display is needed.
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

_SUMMARY = flags.DEFINE_string('summary', None, 'summary.jsonl written by launch.sweep.')
_OUT = flags.DEFINE_string('out', None, 'Output image path (.png or .pdf).')

FIGURES = (('expert_hit_rate', 'expert hit rate'),
           ('host_to_device_bytes_per_token', 'host-to-device bytes per token'),
           ('cpu_expert_fraction', 'CPU expert share'),
           ('time_per_output_token_ms', 'TPOT (ms)'),
           ('mean_accepted_length', 'mean accepted length'))


def read_rows(path: pathlib.Path) -> list[dict]:
  if not path.is_file():
    raise FileNotFoundError(f'Sweep summary {path} not found; run launch.sweep first.')
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  if not rows:
    raise ValueError(f'Sweep summary {path} contains no runs.')
  if not all(isinstance(row, dict) and 'run' in row for row in rows):
    raise ValueError(f'{path} is not a launch.sweep summary: every line needs a "run" key.')
  return rows


def plot(rows: list[dict], out: pathlib.Path) -> None:
  """Write one panel per figure; a run missing a figure (None) gets no bar in that panel."""
  fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 4 + 0.2 * len(rows)))
  labels = [row['run'] for row in rows]
  for axis, (key, title) in zip(axes, FIGURES):
    values = [math.nan if row.get(key) is None else row[key] for row in rows]
    axis.barh(range(len(rows)), values)
    axis.set_yticks(range(len(rows)), labels)
    axis.set_title(title)
    axis.invert_yaxis()
  for axis in axes[1:]:
    axis.set_yticklabels([])
  simulated = any(row.get('device', '').startswith('cpu') for row in rows)
  if simulated:
    fig.suptitle('CPU-only machine: all memory kinds share RAM, so times do not reflect a '
                 'host link', fontsize=9)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _SUMMARY.value or not _OUT.value:
    raise app.UsageError('--summary and --out are required.')
  try:
    plot(read_rows(pathlib.Path(_SUMMARY.value)), pathlib.Path(_OUT.value))
  except (OSError, ValueError, KeyError) as error:
    sys.exit(f'Error: cannot plot {_SUMMARY.value} to {_OUT.value}: {error!r}')
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
