"""Speculative Utility Estimator: a discrete utility level per (layer, expert).

After every target forward pass the estimator reads the activation counts `a[l, e]` of that
pass (tokens of the window routed to expert e in layer l, over the top-k choices) and moves
each expert's utility level `u[l, e]` in 0..K. Level 0 means "not worth device memory".

Each observation runs these steps, vectorised over all layers and experts:
  1. Demand. With calibration on, demand is the per-token frequency f = a / W in [0, 1],
     so one expert used by every token of the window has f = 1 at any window size W.
     With calibration off, demand is the raw count a.
  2. Boundaries. Per layer, K increasing edges e_1 <= ... <= e_K map demand to a level:
     the target level is the number of edges at or below the demand.
     * Calibrated edges: e_1 is the smallest positive frequency, so every used expert has
       target level >= 1. Edge e_k for k >= 2 is the running quantile
       `level_quantiles[k - 2]` of the non-zero frequencies seen in the last
       `quantile_window` observations of that layer. The quantile is the lowest frequency
       bin with at least that fraction of samples strictly below it, so tied frequencies
       share the lower level. Levels are therefore relative to the layer's recent demand.
       When every sample in the window has the same frequency (as after `quantile_window`
       one-token passes, where every used expert has frequency 1), every used expert gets
       target level 1. Before a layer has any sample the edges are (k - 1) / K for k >= 2.
     * Fixed edges (calibration off): `count_boundaries` on raw counts, by default
       1, 2, ..., K, which makes the target level min(a, K).
  3. Demand level. The continuous demand level d adds to the target level k the fraction
     of the way from e_k to e_{k+1} (from 0 to e_1 when k = 0), so d is in [0, K] and
     d = K for every demand at or above e_K.
  4. Transition. With inertia on, u rises by one when d >= u + rise_margin, falls by one
     when d <= u - fall_margin, and otherwise stays. With inertia off, u = floor(d), the
     target level.

Invariants: levels stay in 0..K, with inertia on a level moves at most one step per
observation, and with calibration on the same sequence of per-token frequencies gives the
same levels at any window size.

`predicted_tokens(W)` turns levels into expected tokens for the next pass: W times the
running mean of the next-pass frequency of experts at that level in that layer.
"""

import dataclasses

import numpy as np

# Quantile targets are products of float fractions and sample counts. The tolerance keeps a
# target like 0.8 * 5 from missing the count 4 by one rounding step.
_QUANTILE_TOLERANCE = 1e-9

# Guards the level comparisons of step 4 against rounding in the interpolated demand level.
_LEVEL_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class UtilityConfig:
  """Settings of the Speculative Utility Estimator.

  Margins are in level units. A margin of 1 means one whole level of demand.
  """

  levels: int = 5  # K, the highest utility level. Levels run 0..K.
  inertia: bool = True  # Move at most one level per observation. Off: jump to the target.
  calibration: bool = True  # Normalise demand by window and calibrate edges from quantiles.
  rise_margin: float = 1.0  # Rise when demand level >= level + rise_margin. In (0, 1].
  fall_margin: float = 0.5  # Fall when demand level <= level - fall_margin. In (0, rise).
  quantile_window: int = 32  # Observations whose non-zero frequencies calibrate the edges.
  calibration_bins: int = 64  # Histogram bins on (0, 1] for the running quantiles.
  # Quantiles of non-zero frequency that start levels 2..K (K - 1 increasing values in
  # (0, 1)). None means evenly spaced: (k - 1) / K for level k.
  level_quantiles: tuple[float, ...] | None = None
  # Raw-count edges e_1..e_K used when calibration is off (K increasing positive integers).
  # None means 1, 2, ..., K.
  count_boundaries: tuple[int, ...] | None = None
  prediction_window: int = 32  # Horizon, in observations, of the per-level frequency mean.

  def __post_init__(self):
    if self.levels < 1:
      raise ValueError(f'UtilityConfig.levels must be >= 1, got {self.levels}.')
    if not 0 < self.rise_margin <= 1:
      raise ValueError(f'UtilityConfig.rise_margin must be in (0, 1] so that level K stays '
                       f'reachable, got {self.rise_margin}.')
    if not 0 < self.fall_margin < self.rise_margin:
      raise ValueError(f'UtilityConfig.fall_margin must be in (0, rise_margin='
                       f'{self.rise_margin}) because rising must be harder than falling, '
                       f'got {self.fall_margin}.')
    for name in ('quantile_window', 'prediction_window'):
      if getattr(self, name) < 1:
        raise ValueError(f'UtilityConfig.{name} must be >= 1, got {getattr(self, name)}.')
    if self.calibration_bins < 2:
      raise ValueError(f'UtilityConfig.calibration_bins must be >= 2, got '
                       f'{self.calibration_bins}.')
    self._validate_level_quantiles()
    self._validate_count_boundaries()

  def _validate_level_quantiles(self):
    if self.level_quantiles is None:
      return
    quantiles = np.asarray(self.level_quantiles, dtype=np.float64)
    if quantiles.shape != (self.levels - 1,):
      raise ValueError(f'UtilityConfig.level_quantiles needs levels - 1 = {self.levels - 1} '
                       f'values, got {self.level_quantiles}.')
    if np.any(quantiles <= 0) or np.any(quantiles >= 1) or np.any(np.diff(quantiles) <= 0):
      raise ValueError(f'UtilityConfig.level_quantiles must increase strictly within (0, 1), '
                       f'got {self.level_quantiles}.')

  def _validate_count_boundaries(self):
    if self.count_boundaries is None:
      return
    boundaries = np.asarray(self.count_boundaries)
    if boundaries.shape != (self.levels,):
      raise ValueError(f'UtilityConfig.count_boundaries needs levels = {self.levels} values, '
                       f'got {self.count_boundaries}.')
    if (not np.issubdtype(boundaries.dtype, np.integer) or np.any(boundaries < 1)
        or np.any(np.diff(boundaries) <= 0)):
      raise ValueError(f'UtilityConfig.count_boundaries must be strictly increasing positive '
                       f'integers, got {self.count_boundaries}.')

  def quantiles(self) -> np.ndarray:
    """Return the quantiles that start levels 2..K, shape [K - 1]."""
    if self.level_quantiles is not None:
      return np.asarray(self.level_quantiles, dtype=np.float64)
    return np.arange(1, self.levels, dtype=np.float64) / self.levels

  def fixed_boundaries(self) -> np.ndarray:
    """Return the raw-count edges e_1..e_K used with calibration off, shape [K]."""
    if self.count_boundaries is not None:
      return np.asarray(self.count_boundaries, dtype=np.float64)
    return np.arange(1, self.levels + 1, dtype=np.float64)


class UtilityEstimator:
  """Tracks the utility level of every expert from the activation counts of each pass.

  Attributes:
    levels: [L, E] int utility levels in 0..K, updated in place by `observe`.
  """

  def __init__(self, num_layers: int, num_experts: int, config: UtilityConfig | None = None):
    if num_layers < 1 or num_experts < 1:
      raise ValueError(f'UtilityEstimator needs num_layers >= 1 and num_experts >= 1, got '
                       f'{num_layers} and {num_experts}.')
    self.config = config or UtilityConfig()
    self.num_layers = num_layers
    self.num_experts = num_experts
    k = self.config.levels
    bins = self.config.calibration_bins

    self.levels = np.zeros((num_layers, num_experts), dtype=np.int32)
    # Ring of per-observation histograms of non-zero frequency bins, and their running sum.
    self._histogram_ring = np.zeros((self.config.quantile_window, num_layers, bins), np.int64)
    self._histogram = np.zeros((num_layers, bins), np.int64)
    self._ring_position = 0
    self._boundaries = self._initial_boundaries()
    # Decayed sums of the next-pass frequency of experts per (layer, level), seeded with one
    # pseudo-observation of the prior frequency u / K so a level without data still predicts.
    prior = np.arange(k + 1, dtype=np.float64) / k
    self._frequency_sum = np.tile(prior, (num_layers, 1))  # [L, K + 1]
    self._frequency_weight = np.ones((num_layers, k + 1))  # [L, K + 1]

  @property
  def boundaries(self) -> np.ndarray:
    """Edges e_1..e_K of the last observation, [L, K]: frequencies, or counts if uncalibrated."""
    return self._boundaries.copy()

  def observe(self, counts: np.ndarray, window: int) -> None:
    """Update levels from the activation counts of one forward pass.

    Args:
      counts: [L, E] non-negative integer tokens routed to each expert, each <= window.
      window: W, the number of tokens in the pass.
    """
    counts = self._validate_counts(counts, window)
    self._update_prediction(counts / window)

    if self.config.calibration:
      self._update_histogram(counts, window)
      self._boundaries = self._calibrated_boundaries()
      demand = counts / window
    else:
      demand = counts.astype(np.float64)

    demand_level = _demand_level(demand, self._boundaries)
    if self.config.inertia:
      self.levels = self._inertial_step(demand_level)
    else:
      self.levels = np.floor(demand_level + _LEVEL_TOLERANCE).astype(np.int32)

  def predicted_tokens(self, window: int) -> np.ndarray:
    """Return the expected tokens per expert for a next pass of `window` tokens, [L, E].

    An expert at level u in layer l gets window times the running mean of the next-pass
    frequency observed for experts at level u in layer l. Level 0 always predicts 0, because
    level 0 means the expert is not worth device memory.
    """
    if window < 1:
      raise ValueError(f'predicted_tokens needs window >= 1, got {window}.')
    k = self.config.levels
    # A weight of 0 happens only with prediction_window = 1 and no expert at that level.
    frequency = np.tile(np.arange(k + 1) / k, (self.num_layers, 1))  # Prior u / K.
    has_data = self._frequency_weight > 0
    frequency[has_data] = self._frequency_sum[has_data] / self._frequency_weight[has_data]
    frequency[:, 0] = 0.0
    return window * np.take_along_axis(frequency, self.levels, axis=1)

  def experts_at_or_above(self, layer: int, level: int) -> np.ndarray:
    """Return the sorted ids of the experts of `layer` whose level is >= `level`."""
    if not 0 <= layer < self.num_layers:
      raise ValueError(f'layer must be in [0, {self.num_layers}), got {layer}.')
    return np.flatnonzero(self.levels[layer] >= level)

  def _validate_counts(self, counts: np.ndarray, window: int) -> np.ndarray:
    counts = np.asarray(counts)
    expected_shape = (self.num_layers, self.num_experts)
    if counts.shape != expected_shape:
      raise ValueError(f'counts must have shape [L, E] = {expected_shape}, got {counts.shape}.')
    if not np.issubdtype(counts.dtype, np.integer):
      raise ValueError(f'counts must be integer token counts, got dtype {counts.dtype}.')
    if window < 1:
      raise ValueError(f'window must be >= 1, got {window}.')
    if counts.min() < 0 or counts.max() > window:
      raise ValueError(f'counts must be in [0, window={window}] because a token routes to an '
                       f'expert at most once, got values in [{counts.min()}, {counts.max()}].')
    return counts.astype(np.int64)

  def _update_prediction(self, frequency: np.ndarray) -> None:
    """Add this pass's frequencies to the running mean of the levels they followed."""
    k = self.config.levels
    decay = 1.0 - 1.0 / self.config.prediction_window
    flat_index = (np.arange(self.num_layers)[:, None] * (k + 1) + self.levels).ravel()
    size = self.num_layers * (k + 1)
    observed_sum = np.bincount(flat_index, weights=frequency.ravel(), minlength=size)
    observed_count = np.bincount(flat_index, minlength=size)
    self._frequency_sum = decay * self._frequency_sum + observed_sum.reshape(-1, k + 1)
    self._frequency_weight = decay * self._frequency_weight + observed_count.reshape(-1, k + 1)

  def _update_histogram(self, counts: np.ndarray, window: int) -> None:
    """Replace the oldest observation in the quantile window with this one."""
    bins = self.config.calibration_bins
    # Integer arithmetic puts equal frequencies (1/3, 2/6, 3/9) into the same bin.
    frequency_bin = np.minimum(counts * bins // window, bins - 1)
    layer_index = np.broadcast_to(np.arange(self.num_layers)[:, None], counts.shape)
    used = counts > 0
    flat_index = layer_index[used] * bins + frequency_bin[used]
    observation = np.bincount(flat_index, minlength=self.num_layers * bins)
    observation = observation.reshape(self.num_layers, bins)

    self._histogram += observation - self._histogram_ring[self._ring_position]
    self._histogram_ring[self._ring_position] = observation
    self._ring_position = (self._ring_position + 1) % self.config.quantile_window

  def _calibrated_boundaries(self) -> np.ndarray:
    """Compute the frequency edges [L, K] from the histogram of the quantile window."""
    bins = self.config.calibration_bins
    quantiles = self.config.quantiles()  # [K - 1]
    samples = self._histogram.sum(axis=1)  # [L]
    below = np.concatenate([np.zeros((self.num_layers, 1), np.int64),
                            np.cumsum(self._histogram, axis=1)], axis=1)  # [L, bins + 1]
    # Lowest bin with at least the quantile's share of samples strictly below it. Bin `bins`
    # (past the last) means no frequency reaches that level.
    target_counts = quantiles[None, :] * samples[:, None] - _QUANTILE_TOLERANCE  # [L, K - 1]
    first_bin = np.sum(below[:, None, :] < target_counts[:, :, None], axis=2)  # [L, K - 1]
    edges = np.where(first_bin < bins, first_bin / bins, np.inf)

    edges = np.concatenate([np.full((self.num_layers, 1), np.finfo(np.float64).tiny), edges],
                           axis=1)
    return np.where(samples[:, None] > 0, edges, self._initial_boundaries())

  def _initial_boundaries(self) -> np.ndarray:
    """Return the edges used before any calibration data, [L, K]."""
    k = self.config.levels
    if self.config.calibration:
      edges = np.arange(k, dtype=np.float64) / k
      edges[0] = np.finfo(np.float64).tiny
    else:
      edges = self.config.fixed_boundaries()
    return np.tile(edges, (self.num_layers, 1))

  def _inertial_step(self, demand_level: np.ndarray) -> np.ndarray:
    """Move every level at most one step towards the demand level, with hysteresis."""
    rise = demand_level >= self.levels + self.config.rise_margin - _LEVEL_TOLERANCE
    fall = demand_level <= self.levels - self.config.fall_margin + _LEVEL_TOLERANCE
    levels = self.levels + rise.astype(np.int32) - fall.astype(np.int32)
    return np.clip(levels, 0, self.config.levels).astype(np.int32)


def _demand_level(demand: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Map demand [L, E] through per-layer edges [L, K] to a continuous level in [0, K].

  The integer part is the number of edges at or below the demand. The fraction is the
  position between that edge and the next one, which is > 0 wherever the demand is below
  the next edge, so the division is safe.
  """
  k = edges.shape[1]
  target = np.sum(demand[:, :, None] >= edges[:, None, :], axis=2)  # [L, E] in 0..K

  padded = np.concatenate([np.zeros((edges.shape[0], 1)), edges], axis=1)  # [L, K + 1]
  lower = np.take_along_axis(padded, target, axis=1)
  upper = np.take_along_axis(padded, np.minimum(target + 1, k), axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    fraction = np.where(target < k, (demand - lower) / (upper - lower), 0.0)
  return target + fraction
