"""Tests of the Speculative Utility Estimator on hand-computed sequences."""

import copy

import numpy as np
import pytest

from spac_jax.scheduling.utility import UtilityConfig, UtilityEstimator

# One layer, 8 experts, top-2 routing, window W = 4, so counts sum to 8. Expert 0 takes every
# token (frequency 1) and experts 1..4 one token each (frequency 1/4).
WINDOW = 4
STEADY = np.array([[4, 1, 1, 1, 1, 0, 0, 0]])

# With 4 calibration bins, frequency 1/4 falls in bin 1 and frequency 1 in bin 3. Each pass
# adds one sample to bin 3 and four to bin 1, so 80 % of the samples lie below bin 2. The
# quantiles 0.2, 0.4, 0.6 and 0.8 that start levels 2..5 therefore all sit at bin 2, which
# is frequency 0.5.
# Demand levels: frequency 1 maps to 5, frequency 1/4 to 1 + 0.25 / 0.5 = 1.5.
FOUR_BINS = UtilityConfig(calibration_bins=4)


def observe_sequence(estimator: UtilityEstimator, counts_sequence, window: int,
                     expert: int) -> list[int]:
  """Observe each count array and return the level of `expert` after each pass."""
  trajectory = []
  for counts in counts_sequence:
    estimator.observe(np.asarray(counts), window)
    trajectory.append(int(estimator.levels[0, expert]))
  return trajectory


def test_steady_expert_climbs_to_max():
  estimator = UtilityEstimator(1, 8, FOUR_BINS)
  trajectory = observe_sequence(estimator, [STEADY] * 7, WINDOW, expert=0)
  assert trajectory == [1, 2, 3, 4, 5, 5, 5]
  np.testing.assert_array_equal(estimator.levels, [[5, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_allclose(estimator.boundaries[0, 1:], [0.5, 0.5, 0.5, 0.5])


def test_single_burst_rises_one_level():
  estimator = UtilityEstimator(1, 8, FOUR_BINS)
  burst = np.array([[4, 0, 0, 0, 0, 4, 0, 0]])  # Expert 5 takes every token once.
  sequence = [STEADY, STEADY, burst, STEADY, STEADY]
  assert observe_sequence(estimator, sequence, WINDOW, expert=5) == [0, 0, 1, 0, 0]


def test_burst_from_level_one_rises_one_level():
  estimator = UtilityEstimator(1, 8, FOUR_BINS)
  burst = np.array([[4, 4, 0, 0, 0, 0, 0, 0]])  # Expert 1 jumps from 1/4 to frequency 1.
  assert observe_sequence(estimator, [STEADY, burst], WINDOW, expert=1) == [1, 2]


def test_unused_expert_falls_one_level_per_pass():
  estimator = UtilityEstimator(1, 8, FOUR_BINS)
  observe_sequence(estimator, [STEADY] * 5, WINDOW, expert=0)
  assert estimator.levels[0, 0] == 5
  stopped = np.array([[0, 2, 2, 2, 2, 0, 0, 0]])  # Expert 0 is no longer routed to.
  assert observe_sequence(estimator, [stopped] * 6, WINDOW, expert=0) == [4, 3, 2, 1, 0, 0]


def test_fall_margin_hysteresis():
  # Fixed count edges 2, 4, 6, 8, 10: count 6 is demand level 3, count 5 is 2.5, count 7 is
  # 3.5 and count 4 is 2.
  config = UtilityConfig(calibration=False, count_boundaries=(2, 4, 6, 8, 10),
                         fall_margin=0.6)
  estimator = UtilityEstimator(1, 2, config)
  counts = [[[6, 0]], [[6, 0]], [[6, 0]], [[5, 0]], [[7, 0]], [[4, 0]]]
  # Level 3 stays at 2.5 (0.5 below, under the fall margin 0.6) and at 3.5 (0.5 above,
  # under the rise margin 1), then falls at 2.
  assert observe_sequence(estimator, counts, 10, expert=0) == [1, 2, 3, 3, 3, 2]


def test_inertia_off_jumps_to_target():
  config = UtilityConfig(inertia=False, calibration_bins=4)
  estimator = UtilityEstimator(1, 8, config)
  estimator.observe(STEADY, WINDOW)
  # Frequency 1 is demand level 5, frequency 1/4 is 1.5 and rounds down to target level 1.
  np.testing.assert_array_equal(estimator.levels, [[5, 1, 1, 1, 1, 0, 0, 0]])
  estimator.observe(np.array([[0, 2, 2, 2, 2, 0, 0, 0]]), WINDOW)
  assert estimator.levels[0, 0] == 0


def test_inertia_off_uncalibrated_uses_counts():
  config = UtilityConfig(inertia=False, calibration=False)
  estimator = UtilityEstimator(1, 4, config)
  estimator.observe(np.array([[9, 3, 1, 0]]), 9)
  # Default count edges 1..5: the level is min(count, 5).
  np.testing.assert_array_equal(estimator.levels, [[5, 3, 1, 0]])


def _run_at_window(config: UtilityConfig, window: int, frequencies_in_thirds) -> list:
  """Warm up at W = 4, then observe the given frequencies (in thirds) at `window`."""
  estimator = UtilityEstimator(1, 8, config)
  for _ in range(3):
    estimator.observe(STEADY, WINDOW)
  levels = []
  for thirds in frequencies_in_thirds:
    counts = np.array([thirds]) * window // 3
    estimator.observe(counts, window)
    levels.append(estimator.levels.copy())
  return levels


@pytest.mark.parametrize('windows, pattern', [
    # Experts 0 and 1 take every token. Frequencies 0 and 1 are the only ones W = 1 allows.
    ((1, 5, 9), [3, 3, 0, 0, 0, 0, 0, 0]),
    # Frequencies 1, 2/3 and 1/3, which windows 3, 6 and 9 all represent exactly.
    ((3, 6, 9), [3, 2, 1, 0, 0, 0, 0, 0]),
])
def test_calibrated_levels_independent_of_window(windows, pattern):
  sequence = [pattern] * 4 + [[0, 3, 3, 0, 0, 0, 0, 0]] * 2
  per_window = [_run_at_window(UtilityConfig(), w, sequence) for w in windows]
  for levels in per_window[1:]:
    for step, (expected, actual) in enumerate(zip(per_window[0], levels)):
      np.testing.assert_array_equal(actual, expected, err_msg=f'pass {step}')


def test_uncalibrated_levels_depend_on_window():
  config = UtilityConfig(calibration=False)
  sequence = [[3, 3, 0, 0, 0, 0, 0, 0]] * 4
  at_one = _run_at_window(config, 1, sequence)[-1]
  at_nine = _run_at_window(config, 9, sequence)[-1]
  # Count 1 caps the target at level 1, count 9 lets the level keep climbing.
  assert at_one[0, 0] == 1
  assert at_nine[0, 0] == 5


def test_predicted_tokens_from_level_means():
  estimator = UtilityEstimator(1, 8, UtilityConfig(calibration_bins=4, prediction_window=1))
  np.testing.assert_array_equal(estimator.predicted_tokens(8), np.zeros((1, 8)))
  for _ in range(7):
    estimator.observe(STEADY, WINDOW)
  # With prediction_window 1 the mean is that of the last pass: before it, expert 0 was at
  # level 5 and used by every token, and experts 1..4 at level 1 with frequency 1/4.
  np.testing.assert_allclose(estimator.predicted_tokens(8), [[8, 2, 2, 2, 2, 0, 0, 0]])


def test_predicted_tokens_prior():
  estimator = UtilityEstimator(1, 3, UtilityConfig(levels=4))
  estimator.levels[:] = [[0, 2, 4]]
  # Without observations, level u predicts frequency u / K.
  np.testing.assert_allclose(estimator.predicted_tokens(8), [[0, 4, 8]])


def test_experts_at_or_above():
  estimator = UtilityEstimator(1, 8, FOUR_BINS)
  for _ in range(3):
    estimator.observe(STEADY, WINDOW)
  np.testing.assert_array_equal(estimator.experts_at_or_above(0, 1), [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(estimator.experts_at_or_above(0, 3), [0])
  assert estimator.experts_at_or_above(0, 4).size == 0


def test_observe_is_per_layer():
  estimator = UtilityEstimator(2, 8, FOUR_BINS)
  counts = np.concatenate([STEADY, np.zeros_like(STEADY)])
  counts[1, 7] = 4
  estimator.observe(counts, WINDOW)
  np.testing.assert_array_equal(estimator.levels, [[1, 1, 1, 1, 1, 0, 0, 0],
                                                   [0, 0, 0, 0, 0, 0, 0, 1]])


def test_deepcopy_is_independent():
  estimator = UtilityEstimator(1, 8, FOUR_BINS)
  estimator.observe(STEADY, WINDOW)
  clone = copy.deepcopy(estimator)
  clone.observe(STEADY, WINDOW)
  assert estimator.levels[0, 0] == 1
  assert clone.levels[0, 0] == 2


@pytest.mark.parametrize('kwargs, field', [
    (dict(levels=0), 'levels'),
    (dict(rise_margin=0.0), 'rise_margin'),
    (dict(rise_margin=1.5), 'rise_margin'),
    (dict(fall_margin=0.0), 'fall_margin'),
    (dict(rise_margin=0.5, fall_margin=0.5), 'fall_margin'),
    (dict(quantile_window=0), 'quantile_window'),
    (dict(prediction_window=0), 'prediction_window'),
    (dict(calibration_bins=1), 'calibration_bins'),
    (dict(level_quantiles=(0.5, 0.6)), 'level_quantiles'),
    (dict(level_quantiles=(0.2, 0.4, 0.4, 0.8)), 'level_quantiles'),
    (dict(level_quantiles=(0.0, 0.4, 0.6, 0.8)), 'level_quantiles'),
    (dict(count_boundaries=(1, 2, 3)), 'count_boundaries'),
    (dict(count_boundaries=(1, 2, 2, 4, 5)), 'count_boundaries'),
    (dict(count_boundaries=(0, 1, 2, 3, 4)), 'count_boundaries'),
    (dict(count_boundaries=(1.0, 2.0, 3.0, 4.0, 5.0)), 'count_boundaries'),
])
def test_config_rejects_bad_value(kwargs, field):
  with pytest.raises(ValueError, match=field):
    UtilityConfig(**kwargs)


@pytest.mark.parametrize('counts, window, message', [
    (np.zeros((1, 7), np.int64), 4, 'shape'),
    (np.full((1, 8), 0.5), 4, 'integer'),
    (np.full((1, 8), 5), 4, 'window=4'),
    (np.full((1, 8), -1), 4, r'\[0, window'),
    (np.zeros((1, 8), np.int64), 0, 'window must be >= 1'),
])
def test_observe_rejects_bad_counts(counts, window, message):
  estimator = UtilityEstimator(1, 8)
  with pytest.raises(ValueError, match=message):
    estimator.observe(counts, window)
