"""Tests of the HiGHS workload balancer against a brute force over per-expert residency."""

import itertools

import highspy
import numpy as np
import pytest

from spac_jax.scheduling.balancer import (BalancerResult, CostModel, WorkloadBalancer,
                                          layer_times_ms, pass_time_ms, solve_greedy)

MAX_LEVEL = 3
NUM_RANDOM_INSTANCES = 60


def brute_force_optimum(cost: CostModel, tokens: np.ndarray, resident: np.ndarray,
                        capacity: int, transfer_budget: int) -> float:
  """Minimise the pass time over every binary residency of every expert.

  Written from the cost definition, per expert, and shares no code with the balancer. A
  layer takes max(device side, CPU side). Kept used experts cost device time, plus a transfer
  when not resident. Dropped used experts cost CPU time, and unused experts cost nothing.
  """
  num_layers, num_experts = tokens.shape
  masks = np.array(list(itertools.product([False, True], repeat=tokens.size)))
  masks = masks.reshape(-1, num_layers, num_experts)  # [M, L, E]
  used = tokens > 0
  device_each = cost.device_fixed_ms + cost.device_per_token_ms * tokens
  device_each = device_each + np.where(resident, 0.0, cost.transfer_ms)
  cpu_each = cost.cpu_fixed_ms + cost.cpu_per_token_ms * tokens

  device = np.sum(np.where(masks & used, device_each, 0.0), axis=2)  # [M, L]
  cpu = np.sum(np.where(~masks & used, cpu_each, 0.0), axis=2)  # [M, L]
  total = np.maximum(device, cpu).sum(axis=1)
  feasible = ((masks.sum(axis=(1, 2)) <= capacity)
              & (np.sum(masks & ~resident, axis=(1, 2)) <= transfer_budget))
  return float(total[feasible].min())


def random_instance(seed: int) -> dict:
  """Draw a small instance: at most 12 experts in all, levels 0..3, random costs."""
  rng = np.random.default_rng(seed)
  num_layers = int(rng.integers(1, 3))
  num_experts = int(rng.integers(2, 12 // num_layers + 1))
  shape = (num_layers, num_experts)
  levels = rng.choice(MAX_LEVEL + 1, size=shape, p=[0.4, 0.3, 0.2, 0.1])
  if seed % 2:
    # Per-expert tokens: groups split by token value as well as by level.
    tokens = np.where(rng.random(shape) < 0.25, 0.0, rng.integers(1, 6, size=shape) * 1.0)
  else:
    # Tokens follow the level, as the utility estimator predicts them.
    tokens = levels * 1.5
  cost = CostModel(device_fixed_ms=float(rng.uniform(0, 0.2)),
                   device_per_token_ms=float(rng.uniform(0, 0.05)),
                   cpu_fixed_ms=float(rng.uniform(0.1, 1.0)),
                   cpu_per_token_ms=float(rng.uniform(0.05, 0.5)),
                   transfer_ms=float(rng.choice([0.0, rng.uniform(0.1, 1.5)])),
                   source='profile')
  return dict(cost=cost, levels=levels, tokens=tokens,
              resident=rng.random(shape) < 0.3,
              capacity=int(rng.integers(0, num_layers * num_experts + 1)),
              transfer_budget=int(rng.integers(0, num_layers * num_experts + 1)))


def assert_valid_answer(result: BalancerResult, levels: np.ndarray, resident: np.ndarray,
                        capacity: int, transfer_budget: int) -> None:
  keep = result.resident_target
  assert keep.shape == levels.shape
  assert keep.dtype == np.bool_
  assert keep.sum() <= capacity
  assert np.sum(keep & ~resident) <= transfer_budget
  np.testing.assert_array_equal(result.keep_counts, keep.sum(axis=1))
  assert_thresholds_consistent(result, levels)


def assert_thresholds_consistent(result: BalancerResult, levels: np.ndarray) -> None:
  for layer, threshold in enumerate(result.thresholds):
    keep = result.resident_target[layer]
    assert 0 <= threshold <= MAX_LEVEL + 1
    assert np.all(keep[levels[layer] >= threshold]), 'an expert at or above k_l is dropped'
    if not keep.any():
      assert threshold == MAX_LEVEL + 1
    elif threshold > 0:
      assert not np.all(keep[levels[layer] >= threshold - 1]), 'k_l is not the smallest'
    shaped = np.array_equal(keep, levels[layer] >= threshold)
    assert result.threshold_shaped[layer] == shaped


@pytest.fixture(scope='module')
def instances() -> list[dict]:
  return [random_instance(seed) for seed in range(NUM_RANDOM_INSTANCES)]


def test_highs_matches_brute_force(instances):
  shaped_layers = 0
  for index, case in enumerate(instances):
    balancer = WorkloadBalancer(case['cost'], MAX_LEVEL, time_limit_s=5.0)
    result = balancer.solve(case['levels'], case['tokens'], case['resident'], case['capacity'],
                            case['transfer_budget'])
    expected = brute_force_optimum(case['cost'], case['tokens'], case['resident'],
                                   case['capacity'], case['transfer_budget'])

    assert result.solver == 'highs', f'instance {index}: {result.status}'
    assert result.status == 'optimal'
    assert result.objective_ms == pytest.approx(expected, rel=1e-7, abs=1e-6), f'instance {index}'
    assert_valid_answer(result, case['levels'], case['resident'], case['capacity'],
                        case['transfer_budget'])
    shaped_layers += int(result.threshold_shaped.sum())
  # Most optima keep whole levels, so the shaped branch of the check is exercised.
  assert shaped_layers > 0


def test_objective_is_pass_time_of_mask(instances):
  case = instances[0]
  result = WorkloadBalancer(case['cost'], MAX_LEVEL).solve(
      case['levels'], case['tokens'], case['resident'], case['capacity'],
      case['transfer_budget'])
  expected = pass_time_ms(case['cost'], case['tokens'], case['resident'],
                          result.resident_target)
  assert result.objective_ms == pytest.approx(expected)


def test_layer_times_hand_computed():
  cost = CostModel(device_fixed_ms=1.0, device_per_token_ms=0.5, cpu_fixed_ms=2.0,
                   cpu_per_token_ms=1.0, transfer_ms=3.0)
  tokens = np.array([[2.0, 4.0, 0.0]])
  resident = np.array([[True, False, False]])
  keep = np.array([[True, True, True]])
  # Device: (1 + 0.5 * 2) + (1 + 0.5 * 4) + one transfer of 3 = 8. The unused third expert
  # costs nothing. CPU side: nothing.
  np.testing.assert_allclose(layer_times_ms(cost, tokens, resident, keep), [8.0])
  keep = np.array([[True, False, False]])
  # Device: 2. CPU: 2 + 1 * 4 = 6.
  np.testing.assert_allclose(layer_times_ms(cost, tokens, resident, keep), [6.0])


def test_partial_level_threshold():
  cost = CostModel(device_fixed_ms=0.1, device_per_token_ms=0.0, cpu_fixed_ms=1.0,
                   cpu_per_token_ms=0.0, transfer_ms=0.0)
  levels = np.array([[2, 2, 2, 0]])
  tokens = np.array([[3.0, 3.0, 3.0, 0.0]])
  resident = np.zeros((1, 4), dtype=bool)
  # Room for two of the three level-2 experts: level 2 is kept only in part, so the
  # threshold is 3 and the mask, not the threshold, names the kept experts.
  result = WorkloadBalancer(cost, MAX_LEVEL).solve(levels, tokens, resident, capacity=2,
                                                   transfer_budget=4)
  np.testing.assert_array_equal(result.resident_target, [[True, True, False, False]])
  np.testing.assert_array_equal(result.thresholds, [3])
  np.testing.assert_array_equal(result.threshold_shaped, [False])


def test_whole_level_threshold():
  cost = CostModel(device_fixed_ms=0.1, device_per_token_ms=0.0, cpu_fixed_ms=1.0,
                   cpu_per_token_ms=0.1, transfer_ms=0.0)
  levels = np.array([[3, 1, 2, 0]])
  tokens = np.array([[6.0, 1.0, 3.0, 0.0]])
  result = WorkloadBalancer(cost, MAX_LEVEL).solve(levels, tokens, np.zeros((1, 4), bool),
                                                   capacity=2, transfer_budget=2)
  np.testing.assert_array_equal(result.resident_target, [[True, False, True, False]])
  np.testing.assert_array_equal(result.thresholds, [2])
  np.testing.assert_array_equal(result.threshold_shaped, [True])


def test_prefers_resident_within_level():
  cost = CostModel(device_fixed_ms=0.1, device_per_token_ms=0.0, cpu_fixed_ms=1.0,
                   cpu_per_token_ms=0.0, transfer_ms=0.5)
  levels = np.array([[2, 2, 2]])
  tokens = np.full((1, 3), 3.0)
  resident = np.array([[False, False, True]])
  result = WorkloadBalancer(cost, MAX_LEVEL).solve(levels, tokens, resident, capacity=1,
                                                   transfer_budget=1)
  np.testing.assert_array_equal(result.resident_target, [[False, False, True]])


def test_zero_capacity_keeps_nothing():
  cost = CostModel(0.1, 0.0, 1.0, 0.0, 0.0)
  levels = np.array([[3, 3], [1, 0]])
  result = WorkloadBalancer(cost, MAX_LEVEL).solve(levels, levels * 1.0, np.ones((2, 2), bool),
                                                   capacity=0, transfer_budget=5)
  assert not result.resident_target.any()
  np.testing.assert_array_equal(result.thresholds, [MAX_LEVEL + 1, MAX_LEVEL + 1])


def test_tiny_time_limit_falls_back(instances):
  case = instances[3]
  balancer = WorkloadBalancer(case['cost'], MAX_LEVEL, time_limit_s=1e-9)
  result = balancer.solve(case['levels'], case['tokens'], case['resident'], case['capacity'],
                          case['transfer_budget'])
  assert result.solver == 'greedy'
  assert 'Time limit' in result.status
  assert_valid_answer(result, case['levels'], case['resident'], case['capacity'],
                      case['transfer_budget'])


def _raise_on_construction() -> highspy.Highs:
  raise RuntimeError('injected HiGHS construction failure')


class _FailingRunHighs(highspy.Highs):
  """A real Highs whose run raises, standing in for a crashing solve."""

  def run(self):
    raise RuntimeError('injected HiGHS run failure')


@pytest.mark.parametrize('factory, reason', [
    (_raise_on_construction, 'construction failure'),
    (_FailingRunHighs, 'run failure'),
])
def test_injected_failure_falls_back(instances, factory, reason):
  for case in instances[:10]:
    balancer = WorkloadBalancer(case['cost'], MAX_LEVEL, highs_factory=factory)
    result = balancer.solve(case['levels'], case['tokens'], case['resident'],
                            case['capacity'], case['transfer_budget'])
    assert result.solver == 'greedy'
    assert reason in result.status
    assert_valid_answer(result, case['levels'], case['resident'], case['capacity'],
                        case['transfer_budget'])


def test_greedy_valid_and_no_worse_than_cpu(instances):
  for case in instances:
    result = solve_greedy(case['cost'], MAX_LEVEL, case['levels'], case['tokens'],
                          case['resident'], case['capacity'], case['transfer_budget'])
    all_cpu = pass_time_ms(case['cost'], case['tokens'], case['resident'],
                           np.zeros_like(case['resident']))
    optimum = brute_force_optimum(case['cost'], case['tokens'], case['resident'],
                                  case['capacity'], case['transfer_budget'])
    assert result.solver == 'greedy'
    assert_valid_answer(result, case['levels'], case['resident'], case['capacity'],
                        case['transfer_budget'])
    assert result.objective_ms <= all_cpu + 1e-9
    assert result.objective_ms >= optimum - 1e-9


@pytest.mark.parametrize('field', ['device_fixed_ms', 'device_per_token_ms', 'cpu_fixed_ms',
                                   'cpu_per_token_ms', 'transfer_ms'])
@pytest.mark.parametrize('value', [-1.0, float('inf'), float('nan')])
def test_cost_model_rejects_bad_value(field, value):
  values = dict(device_fixed_ms=0.1, device_per_token_ms=0.1, cpu_fixed_ms=0.1,
                cpu_per_token_ms=0.1, transfer_ms=0.1)
  values[field] = value
  with pytest.raises(ValueError, match=field):
    CostModel(**values)


def test_cost_model_rejects_unknown_source():
  with pytest.raises(ValueError, match='source'):
    CostModel(0.1, 0.1, 0.1, 0.1, 0.1, source='guess')


@pytest.mark.parametrize('change, field', [
    (dict(levels=np.array([[4, 0]])), 'levels'),
    (dict(levels=np.array([[1.0, 0.0]])), 'levels'),
    (dict(tokens=np.array([[-1.0, 0.0]])), 'predicted_tokens'),
    (dict(tokens=np.array([[1.0, 0.0, 0.0]])), 'predicted_tokens'),
    (dict(resident=np.array([[1, 0]])), 'resident'),
    (dict(capacity=-1), 'capacity'),
    (dict(transfer_budget=1.5), 'transfer_budget'),
])
def test_solve_rejects_bad_input(change, field):
  args = dict(levels=np.array([[1, 0]]), tokens=np.array([[1.0, 0.0]]),
              resident=np.array([[False, False]]), capacity=1, transfer_budget=1)
  args.update(change)
  balancer = WorkloadBalancer(CostModel(0.1, 0.1, 0.1, 0.1, 0.1), MAX_LEVEL)
  with pytest.raises(ValueError, match=field):
    balancer.solve(args['levels'], args['tokens'], args['resident'], args['capacity'],
                   args['transfer_budget'])
