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

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from spac_jax import experiment, validation
from spac_jax.cli import parse_flags, resolve_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs and the summary.')
_GRID = flags.DEFINE_multi_string('grid', [], "Swept field and values: 'section.field=v1,v2'.")

COLUMNS = ('tokens_per_second', 'time_per_output_token_ms', 'mean_accepted_length',
           'expert_hit_rate', 'host_to_device_bytes_per_token', 'cpu_expert_fraction')


def _lookup(config, field: str):
  """Return (parent ConfigDict, leaf name) of a dotted field, or raise naming it."""
  *sections, name = field.split('.')
  parent = config
  for section in sections:
    if not isinstance(parent, ml_collections.ConfigDict) or section not in parent:
      raise ValueError(f'config has no field {field!r}.')
    parent = parent[section]
  if not isinstance(parent, ml_collections.ConfigDict) or name not in parent:
    raise ValueError(f'config has no field {field!r}.')
  return parent, name


def parse_grid(specs: list[str], config) -> list[tuple[str, list]]:
  """Parse 'a.b=v1,v2' specs into (field, typed values), typed like the config's field."""
  grid = []
  for spec in specs:
    field, separator, values = spec.partition('=')
    if not separator or not values:
      raise ValueError(f"Invalid --grid {spec!r}; expected 'section.field=value1,value2'.")
    if field in (seen for seen, _ in grid):
      raise ValueError(f'Invalid --grid {spec!r}: {field!r} is swept twice; list all its '
                       'values in one --grid.')
    try:
      parent, name = _lookup(config, field)
      kind = type(parent[name])
      grid.append((field, [_typed(kind, value) for value in values.split(',')]))
    except ValueError as error:
      raise ValueError(f'Invalid --grid {spec!r}: {error}') from error
  return grid


def _typed(kind: type, value: str):
  if not value:
    raise ValueError('empty value (a stray comma?).')
  if kind is bool:
    if value.lower() not in ('true', 'false'):
      raise ValueError(f'Invalid boolean {value!r}; use true or false.')
    return value.lower() == 'true'
  try:
    return kind(value)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{value!r} is not a valid {kind.__name__}.') from error


def grid_configs(base_config, grid: list[tuple[str, list]]) -> list[tuple[str, dict, object]]:
  """Build and validate every run's config before any run starts.

  Returns:
    (run name, swept field values, config) per grid point.
  """
  configs = []
  fields = [field for field, _ in grid]
  for values in itertools.product(*(values for _, values in grid)):
    config = base_config.copy_and_resolve_references()
    for field, value in zip(fields, values):
      parent, name = _lookup(config, field)
      parent[name] = value
    name = ','.join(f'{f}={v}' for f, v in zip(fields, values)) or 'base'
    try:
      validation.validate(config)
    except validation.ConfigError as error:
      raise validation.ConfigError(f'Sweep run {name}: {error}') from error
    configs.append((name, dict(zip(fields, values)), config))
  return configs


def run_grid(base_config, grid: list[tuple[str, list]], workdir: pathlib.Path) -> list[dict]:
  """Run every grid point; the summary covers the finished runs even if a later one fails."""
  rows = []
  try:
    for name, swept, config in grid_configs(base_config, grid):
      logging.info('Sweep run %s', name)
      results = experiment.run(config, workdir / name)
      rows.append({'run': name, **swept, **results})
  finally:
    if rows:
      write_summary(rows, workdir)
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
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required, e.g. --workdir=runs/sweep.')
  workdir = pathlib.Path(_WORKDIR.value)
  config = resolve_config(_CONFIG.value)
  try:
    grid = parse_grid(_GRID.value, config)
    rows = run_grid(config, grid, workdir)
  except (validation.ConfigError, OSError, ValueError) as error:
    sys.exit(f'Error: {error}')
  logging.info('Summary of %d runs in %s', len(rows), workdir / 'summary.md')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
