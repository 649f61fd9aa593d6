"""Command-line helpers shared by the entry points."""

import re
import sys

import ml_collections
from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags; exit with a one-line error for a bad config file, variant or override."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    text = str(error).replace('\\n', '\n').replace("\\'", "'")
    names = re.findall(r'[A-Za-z_][A-Za-z0-9_]*', text)
    field = names[0] if names else text
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    hint = f' Did you mean {suggestion.group(1)!r}?' if suggestion else ''
    overrides = [arg.split('=')[0] for arg in argv[1:]
                 if arg.startswith('--config.') and arg.split('=')[0].endswith(f'.{field}')]
    sys.exit(f'Error: unknown config field {field!r} in {overrides or "the overrides"}.{hint} '
             'Check the spelling against the config file.')
  except flags.Error as error:
    # A config file that raises carries its traceback in the message; keep its two ends.
    lines = [line for line in str(error).splitlines() if line.strip()]
    sys.exit('Error: ' + (lines[0] if len(lines) < 2 else f'{lines[0]} {lines[-1]}'))
  except (OSError, ValueError) as error:
    sys.exit(f'Error: invalid --config: {error}')


def resolve_config(value) -> ml_collections.ConfigDict:
  """Return the parsed config, or exit with one line if its file failed to load."""
  if value is None:
    sys.exit('Error: --config is required, e.g. --config=configs/default.py.')
  try:
    value.keys()  # A config file that failed to load raises here, not at parse time.
  except Exception:  # pylint: disable=broad-except
    filename = getattr(flags.FLAGS['config'], 'config_filename', '')
    sys.exit(f'Error: cannot load --config={filename}: the file is missing or its get_config '
             'failed (its error is printed above).')
  return value
