"""Rotary embedding frequencies, with the RoPE scalings of Hugging Face checkpoints.

`ModelConfig.rope_scaling` contains the checkpoint's RoPE parameters other than the base, as
sorted (name, value) pairs, e.g. (('factor', 40.0), ..., ('rope_type', 'yarn')). Empty means
the default RoPE. The formulas follow transformers 5.25.0's `modeling_rope_utils`:
  linear  inv_freq / factor.
  llama3  inv_freq / factor for wavelengths above original_max_position_embeddings /
          low_freq_factor, unchanged below original / high_freq_factor, and a linear blend
          between the two.
  yarn    a blend of inv_freq (extrapolation) and inv_freq / factor (interpolation) with a
          linear ramp over the dims between the correction range of beta_fast and beta_slow,
          plus an attention factor that scales cos and sin; MLA models also multiply the
          softmax scale by mscale(factor, mscale_all_dim)^2.
"""

import functools
import math

import numpy as np

ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn')


def scaling_dict(rope_scaling: tuple[tuple[str, object], ...]) -> dict[str, object]:
  values = dict(rope_scaling)
  values.setdefault('rope_type', 'default')
  return values


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: np.ndarray, dim: int, theta: float, values: dict) -> np.ndarray:
  """YaRN's blend of extrapolated and interpolated frequencies."""
  factor = float(values['factor'])
  original = float(values['original_max_position_embeddings'])
  beta_fast = float(values.get('beta_fast') or 32)
  beta_slow = float(values.get('beta_slow') or 1)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if values.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # Avoids a zero-width ramp, as transformers does.
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


def _llama3(inv_freq: np.ndarray, values: dict) -> np.ndarray:
  factor = float(values['factor'])
  low_factor, high_factor = float(values['low_freq_factor']), float(values['high_freq_factor'])
  original = float(values['original_max_position_embeddings'])
  wavelength = 2 * math.pi / inv_freq
  scaled = np.where(wavelength > original / low_factor, inv_freq / factor, inv_freq)
  smooth = (original / wavelength - low_factor) / (high_factor - low_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelength >= original / high_factor) & (wavelength <= original / low_factor)
  return np.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=64)
def frequencies(dim: int, theta: float, rope_scaling: tuple[tuple[str, object], ...]
                ) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim / 2] (float32) and the factor on cos and sin.

  Raises:
    ValueError: an unsupported rope_type, or a scaling parameter it needs is missing.
  """
  values = scaling_dict(rope_scaling)
  rope_type = values['rope_type']
  inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  try:
    if rope_type == 'default':
      return inv_freq.astype(np.float32), 1.0
    if rope_type == 'linear':
      return (inv_freq / float(values['factor'])).astype(np.float32), 1.0
    if rope_type == 'llama3':
      return _llama3(inv_freq, values).astype(np.float32), 1.0
    if rope_type == 'yarn':
      return _yarn(inv_freq, dim, theta, values).astype(np.float32), yarn_attention_factor(values)
  except KeyError as error:
    raise ValueError(f'RoPE scaling {values} lacks the parameter {error} that rope_type '
                     f'{rope_type!r} needs.') from error
  raise ValueError(f'rope_type={rope_type!r} is not supported; spac_jax implements '
                   f'{list(ROPE_TYPES)}.')


def yarn_attention_factor(values: dict) -> float:
  """YaRN's factor on cos and sin: attention_factor, else from factor, mscale, mscale_all_dim."""
  if values.get('attention_factor') is not None:
    return float(values['attention_factor'])
  factor = float(values['factor'])
  mscale, mscale_all_dim = values.get('mscale'), values.get('mscale_all_dim')
  if mscale and mscale_all_dim:
    return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
  return _yarn_mscale(factor)


def mla_softmax_factor(rope_scaling: tuple[tuple[str, object], ...]) -> float:
  """Extra factor on the MLA softmax scale: mscale(factor, mscale_all_dim)^2 under YaRN."""
  values = scaling_dict(rope_scaling)
  if values['rope_type'] == 'default' or not values.get('mscale_all_dim'):
    return 1.0
  return _yarn_mscale(float(values['factor']), float(values['mscale_all_dim'])) ** 2
