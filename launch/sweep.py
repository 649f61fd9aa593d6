"""Run a grid of experiments and collect one table.

  python -m launch.sweep --config=configs/default.py --workdir=runs/sweep \\
      --grid='offload.policy=lru,on_demand,spac' --grid='decode.mode=speculative,autoregressive'

Each `--grid` flag names one config field and its values. The sweep runs the cartesian
product, each run in `workdir/<field=value,...>/`. Then it writes `summary.jsonl` (one line
per run: the swept values and its results) and `summary.md` (a table of headline figures).
Base-config overrides such as `--config.data.num_prompts=5` apply to every run.
"""

import itertools
import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from spac_jax import experiment, validation
from spac_jax.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs and the summary.')
_GRID = flags.DEFINE_multi_string('grid', [], "Swept field and values: 'section.field=v1,v2'.")

COLUMNS = ('tokens_per_second', 'time_per_output_token_ms', 'mean_accepted_length',
           'expert_hit_rate', 'host_to_device_bytes_per_token', 'cpu_expert_fraction')


def parse_grid(specs: list[str], config) -> list[tuple[str, list]]:
  """Parse 'a.b=v1,v2' specs into (field, typed values), typed like the config's field."""
  grid = []
  for spec in specs:
    field, separator, values = spec.partition('=')
    if not separator or not values:
      raise ValueError(f"Invalid --grid {spec!r}; expected 'section.field=value1,value2'.")
    section, _, name = field.partition('.')
    if section not in config or name not in config[section]:
      raise ValueError(f'Invalid --grid {spec!r}: config has no field {field!r}.')
    kind = type(config[section][name])
    grid.append((field, [_typed(kind, value) for value in values.split(',')]))
  return grid


def _typed(kind: type, value: str):
  if kind is bool:
    if value.lower() not in ('true', 'false'):
      raise ValueError(f'Invalid boolean {value!r}; use true or false.')
    return value.lower() == 'true'
  return kind(value)


def run_grid(base_config, grid: list[tuple[str, list]], workdir: pathlib.Path) -> list[dict]:
  rows = []
  fields = [field for field, _ in grid]
  for values in itertools.product(*(values for _, values in grid)):
    config = base_config.copy_and_resolve_references()
    for field, value in zip(fields, values):
      section, name = field.split('.')
      config[section][name] = value
    name = ','.join(f'{f}={v}' for f, v in zip(fields, values)) or 'base'
    logging.info('Sweep run %s', name)
    results = experiment.run(config, workdir / name)
    rows.append({'run': name, **dict(zip(fields, values)), **results})
  return rows


def write_summary(rows: list[dict], workdir: pathlib.Path) -> None:
  with open(workdir / 'summary.jsonl', 'w') as out:
    for row in rows:
      out.write(json.dumps(row) + '\n')
  lines = ['| run | ' + ' | '.join(COLUMNS) + ' |', '| --- ' * (len(COLUMNS) + 1) + '|']
  for row in rows:
    cells = [_format(row.get(column)) for column in COLUMNS]
    lines.append(f"| {row['run']} | " + ' | '.join(cells) + ' |')
  (workdir / 'summary.md').write_text('\n'.join(lines) + '\n')


def _format(value) -> str:
  if isinstance(value, float):
    return f'{value:.3f}'
  return 'n/a' if value is None else str(value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required.')
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    grid = parse_grid(_GRID.value, _CONFIG.value)
    rows = run_grid(_CONFIG.value, grid, workdir)
  except (validation.ConfigError, FileNotFoundError, ValueError) as error:
    sys.exit(f'Error: {error}')
  write_summary(rows, workdir)
  logging.info('Summary of %d runs in %s', len(rows), workdir / 'summary.md')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
