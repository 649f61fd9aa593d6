"""Run one experiment from an ml_collections config file.

  python -m spac_jax.launch --config=configs/default.py --workdir=runs/default \\
      [--config.offload.policy=on_demand] [--config.decode.draft_len=8] ...
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from spac_jax import experiment, validation
from spac_jax.cli import parse_flags, resolve_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for config.json, generations.jsonl '
                               'and results.json.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = resolve_config(_CONFIG.value)
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required, e.g. --workdir=runs/default.')
  logging.info('Config:\n%s', config)
  try:
    experiment.run(config, _WORKDIR.value)
  except (validation.ConfigError, OSError, ValueError) as error:
    sys.exit(f'Error: {error}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
