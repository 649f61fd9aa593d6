"""Training corpus of the embedded models: the Python standard library's own source files.

Every machine with Python has it, so the embedded checkpoints can be retrained anywhere
without downloads. Files are split into train and validation by a hash of their path
relative to the standard library, so the split is the same on every machine with the same
Python version.
"""

import hashlib
import pathlib
import sysconfig

import numpy as np

from spac_jax.data.tokenizer import ByteTokenizer


def stdlib_source_files() -> list[pathlib.Path]:
  """List the standard library's .py files, excluding installed third-party packages."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = sorted(p for p in root.rglob('*.py') if 'site-packages' not in p.parts)
  if not files:
    raise FileNotFoundError(f'No .py files found under the standard library at {root}.')
  return files


def is_validation_file(path: pathlib.Path, validation_fraction: float) -> bool:
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
  return int.from_bytes(digest[:8], 'little') / 2**64 < validation_fraction


def load_split(split: str, validation_fraction: float, tokenizer: ByteTokenizer) -> np.ndarray:
  """Concatenate the files of one split into a token stream, each file as BOS text EOS."""
  if split not in ('train', 'validation'):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
  want_validation = split == 'validation'
  pieces = []
  for path in stdlib_source_files():
    if is_validation_file(path, validation_fraction) != want_validation:
      continue
    text = path.read_text(encoding='utf-8', errors='replace')
    pieces.append(np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], np.int32))
  if not pieces:
    raise ValueError(f'The {split} split is empty at validation_fraction={validation_fraction}.')
  return np.concatenate(pieces)


def sample_windows(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator
                   ) -> np.ndarray:
  """Sample `batch` random windows of `length + 1` tokens (inputs plus shifted targets)."""
  starts = rng.integers(0, len(stream) - length - 1, size=batch)
  return np.stack([stream[s:s + length + 1] for s in starts])
