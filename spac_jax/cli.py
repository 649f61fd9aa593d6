"""Command-line helpers shared by the entry points."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags, turning an unknown config override into a one-line error."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    sys.exit(f'Error: unknown config field {error} in overrides {overrides}. Check the '
             'spelling against the config file (fields are printed in config.json of a run).')
  except flags.Error as error:
    sys.exit(f'Error: {error}')
