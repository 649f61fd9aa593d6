"""Heterogeneous Workload Balancer: which experts are device-resident for the next pass.

The accelerator and the CPU compute a layer's experts in parallel, so a layer takes
max(device side, CPU side) under the cost model:

  device side = sum over kept used experts of (device_fixed + device_per_token * tokens)
                + transfer_ms * (experts of the layer that are kept but not yet resident)
  CPU side    = sum over not-kept used experts of (cpu_fixed + cpu_per_token * tokens)

An expert is used when its predicted tokens are > 0. Every transfer counts against its own
layer, so no transfer is assumed hidden behind earlier layers.
TODO: a copy is charged in full to the next pass unless the caller divides transfer_ms by a
fixed reuse estimate (`config.spac.transfer_amortization`). An estimate from each expert's
utility history is missing. With spare slots the default keeps too few experts: on the
embedded model at cache_ratio 1 (20 HumanEval prompts), spac reaches a hit rate of 0.89
where LRU reaches 0.99. The balancer minimises the sum
of layer times subject to: kept experts <= capacity (device slots over all layers) and newly
copied experts <= transfer_budget.

Integer program solved with HiGHS:
  1. Group the used experts by (layer, level, resident, predicted tokens). Experts of a group
     cost the same, so only how many of them are kept matters: one integer y_g in [0, size_g]
     per group replaces one binary per expert.
  2. Add one continuous makespan z_l per layer and two rows per layer:
     z_l >= device side and z_l >= CPU side, both linear in y.
  3. Add the capacity row and the transfer-budget row, and minimise sum_l z_l.
  4. Decode: keep the first y_g experts (lowest ids) of every group. Resident and
     non-resident experts of a level are separate groups, so the solver keeps the resident
     ones first whenever that saves a transfer.
Experts with zero predicted tokens are never kept, because keeping one saves nothing and a
non-resident one would cost a transfer.

When HiGHS raises, returns a non-optimal status, or reaches its time limit, a greedy
heuristic (`solve_greedy`) chooses the residency instead, so a failed or slow solve never
stops decoding.

NOTE: predicted tokens are expectations. An expert with expected tokens > 0 is charged its
full fixed cost on its side, although it may go unused in the pass.
"""

import dataclasses
import math
import os
import sys
import threading
import time
from typing import Callable, NamedTuple

from absl import logging
import highspy
import numpy as np

# mip_feasibility_tolerance of HiGHS is 1e-6, so integer columns come back within that of an
# integer value.
_INTEGER_TOLERANCE = 1e-6

# HiGHS options for a program of a few integers per layer. With one thread they cut the median
# one-layer solve() from 2.3 ms to 0.7 ms, and the 48-layer one from 15 ms to 3 ms (highspy
# 1.16, 2-core CPU with one core busy, benchmarks/balancer_bench.py). The feasibility-jump
# heuristic took most of that time. Presolve and symmetry detection find nothing to reduce
# here. None of the three changes the optimum, because mip_rel_gap stays 0.
_FAST_MIP_OPTIONS = {
    'mip_heuristic_run_feasibility_jump': False,
    'presolve': 'off',
    'mip_detect_symmetry': False,
}

_banner_lock = threading.Lock()
_banner_shown = False


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Time constants of one expert, in milliseconds."""

  device_fixed_ms: float  # Accelerator time per resident expert that is used.
  device_per_token_ms: float  # Accelerator time per token routed to a resident expert.
  cpu_fixed_ms: float  # CPU time per non-resident used expert, mostly reading its weights.
  cpu_per_token_ms: float  # CPU time per token routed to a non-resident expert.
  transfer_ms: float  # Host-to-device copy of one expert.
  source: str = 'profile'  # 'profile' (hardware profile) or 'measured' (timed on this run).

  def __post_init__(self):
    for field in ('device_fixed_ms', 'device_per_token_ms', 'cpu_fixed_ms', 'cpu_per_token_ms',
                  'transfer_ms'):
      value = getattr(self, field)
      if not math.isfinite(value) or value < 0:
        raise ValueError(f'CostModel.{field} must be finite and >= 0, got {value}.')
    if self.source not in ('profile', 'measured'):
      raise ValueError(f"CostModel.source must be 'profile' or 'measured', got {self.source!r}.")


@dataclasses.dataclass(frozen=True)
class BalancerResult:
  """Residency chosen for the next pass.

  `thresholds[l]` is the smallest level k in 0..K+1 such that every expert of layer l at level
  >= k is kept, and K + 1 where the layer keeps no expert. Where the optimum keeps only part
  of a level, the threshold is one above that level, the kept part of it appears only in
  `resident_target`, and `threshold_shaped[l]` is False. The mask is always authoritative.
  """

  thresholds: np.ndarray  # [L] int in 0..K+1.
  keep_counts: np.ndarray  # [L] int, experts kept per layer.
  resident_target: np.ndarray  # [L, E] bool, the experts to have resident for the next pass.
  threshold_shaped: np.ndarray  # [L] bool, kept set == {level >= thresholds[l]}.
  objective_ms: float  # Predicted pass time of resident_target under the cost model.
  solver: str  # 'highs' or 'greedy'.
  status: str  # 'optimal', or the reason the greedy fallback was used.
  solve_time_ms: float  # Wall time of the whole call: grouping, solve and decoding.


class _Groups(NamedTuple):
  """Used experts grouped by (layer, level, resident, tokens), members sorted by group."""

  layer: np.ndarray  # [G] int.
  resident: np.ndarray  # [G] bool.
  size: np.ndarray  # [G] int.
  device_ms: np.ndarray  # [G] device time of keeping one member, transfer included.
  cpu_ms: np.ndarray  # [G] CPU time of one member left on the CPU.
  member_flat_ids: np.ndarray  # [N] flat expert ids (l * E + e), grouped, ids ascending.
  member_rank: np.ndarray  # [N] position of each member within its group.
  member_group: np.ndarray  # [N] group of each member.


def layer_times_ms(cost: CostModel, predicted_tokens: np.ndarray, resident: np.ndarray,
                   keep: np.ndarray) -> np.ndarray:
  """Compute each layer's predicted time, max(device side, CPU side), per expert. [L]."""
  used = predicted_tokens > 0
  kept = keep & used
  device = np.where(kept, cost.device_fixed_ms + cost.device_per_token_ms * predicted_tokens, 0)
  device = device.sum(axis=1) + cost.transfer_ms * np.sum(kept & ~resident, axis=1)
  cpu = np.where(used & ~keep, cost.cpu_fixed_ms + cost.cpu_per_token_ms * predicted_tokens, 0)
  return np.maximum(device, cpu.sum(axis=1))


def pass_time_ms(cost: CostModel, predicted_tokens: np.ndarray, resident: np.ndarray,
                 keep: np.ndarray) -> float:
  """Return the predicted pass time, the sum of `layer_times_ms`."""
  return float(layer_times_ms(cost, predicted_tokens, resident, keep).sum())


def _new_highs() -> highspy.Highs:
  """Construct a Highs instance without the banner HiGHS prints on first construction.

  highspy 1.16 prints its banner to file descriptor 1 from C++ when the first Highs() of the
  process is built, before any option can be set. The first construction therefore runs with
  fd 1 pointed at /dev/null. Output of other threads during that construction (under 1 ms)
  is lost too.
  """
  global _banner_shown
  with _banner_lock:
    if _banner_shown:
      return highspy.Highs()
    sys.stdout.flush()
    saved_fd = os.dup(1)
    null_fd = os.open(os.devnull, os.O_WRONLY)
    try:
      os.dup2(null_fd, 1)
      highs = highspy.Highs()
    finally:
      sys.stdout.flush()
      os.dup2(saved_fd, 1)
      os.close(saved_fd)
      os.close(null_fd)
    _banner_shown = True
    return highs


class WorkloadBalancer:
  """Chooses per-pass residency with HiGHS, falling back to `solve_greedy`.

  One HiGHS instance is built on the first solve and reused. Tests inject a failing solver
  through `highs_factory`.
  """

  def __init__(self, cost: CostModel, max_level: int, time_limit_s: float = 0.05,
               threads: int | None = 1,
               highs_factory: Callable[[], highspy.Highs] = _new_highs):
    """Set up the balancer.

    Args:
      cost: time constants of one expert.
      max_level: K, the highest utility level.
      time_limit_s: HiGHS time limit per solve. The default keeps a solve well inside one
        verification pass of a large MoE model.
      threads: HiGHS worker threads, or None for the HiGHS default. On a 2-core CPU with one
        core busy, one thread cut the median one-layer solve from 7.7 ms to 0.7 ms, because
        the second worker waits for the busy core. HiGHS fixes its thread count for the whole
        process at the first MIP solve. A later instance that requests another count fails
        every run, so each solve then falls back to the greedy heuristic, with a warning in
        the log.
      highs_factory: builds the Highs instance.
    """
    if max_level < 1:
      raise ValueError(f'max_level must be >= 1, got {max_level}.')
    if not time_limit_s > 0:
      raise ValueError(f'time_limit_s must be > 0, got {time_limit_s}.')
    self.cost = cost
    self.max_level = max_level
    self.time_limit_s = time_limit_s
    self.threads = threads
    self._highs_factory = highs_factory
    self._highs: highspy.Highs | None = None

  def solve(self, levels: np.ndarray, predicted_tokens: np.ndarray, resident: np.ndarray,
            capacity: int, transfer_budget: int) -> BalancerResult:
    """Choose the resident experts for the next pass.

    Args:
      levels: [L, E] int utility levels in 0..K.
      predicted_tokens: [L, E] non-negative expected tokens per expert.
      resident: [L, E] bool, experts in the device cache now.
      capacity: device expert slots over all layers.
      transfer_budget: most experts copied host to device for this pass.

    Returns:
      The HiGHS optimum, or the greedy result with the reason in `status`.
    """
    start = time.perf_counter()
    levels, predicted_tokens, resident = _validate_inputs(
        levels, predicted_tokens, resident, capacity, transfer_budget, self.max_level)
    groups = _group_experts(self.cost, levels, predicted_tokens, resident)

    keep_per_group, failure = self._solve_highs(groups, levels.shape[0], capacity,
                                                transfer_budget)
    if failure is None:
      keep = _decode(groups, keep_per_group, levels.shape)
      failure = _check_limits(keep, resident, capacity, transfer_budget)
    if failure is not None:
      keep = _decode(groups, _greedy_counts(groups, levels.shape[0], capacity, transfer_budget),
                     levels.shape)
      logging.log_every_n_seconds(logging.WARNING,
                                  'Workload balancer fell back to the greedy heuristic: %s', 60,
                                  failure)
      return _result(self.cost, levels, predicted_tokens, resident, keep, 'greedy',
                     f'greedy fallback: {failure}', self.max_level, start)
    return _result(self.cost, levels, predicted_tokens, resident, keep, 'highs', 'optimal',
                   self.max_level, start)

  def _solve_highs(self, groups: _Groups, num_layers: int, capacity: int,
                   transfer_budget: int) -> tuple[np.ndarray, str | None]:
    """Return the kept count per group and None, or an empty array and the failure."""
    lp = _build_lp(groups, num_layers, capacity, transfer_budget)
    try:
      highs = self._get_highs()
      highs.clearModel()
      pass_status = highs.passModel(lp)
      if pass_status == highspy.HighsStatus.kError:
        return np.zeros(0, np.int64), 'HiGHS rejected the model in passModel'
      if highs.run() == highspy.HighsStatus.kError:
        return np.zeros(0, np.int64), 'HiGHS run returned an error'
      model_status = highs.getModelStatus()
      if model_status != highspy.HighsModelStatus.kOptimal:
        status_text = highs.modelStatusToString(model_status)
        return np.zeros(0, np.int64), f'HiGHS model status {status_text!r}'
      values = np.asarray(highs.getSolution().col_value[:len(groups.size)])
    except Exception as error:  # pylint: disable=broad-except
      # Any solver error must leave decoding running, so the greedy heuristic takes over.
      self._highs = None
      return np.zeros(0, np.int64), f'HiGHS raised {type(error).__name__}: {error}'

    counts = np.rint(values).astype(np.int64)
    if np.any(np.abs(values - counts) > _INTEGER_TOLERANCE):
      return np.zeros(0, np.int64), 'HiGHS returned a non-integer group count'
    return np.clip(counts, 0, groups.size), None

  def _get_highs(self) -> highspy.Highs:
    if self._highs is None:
      highs = self._highs_factory()
      options = {'output_flag': False, 'time_limit': float(self.time_limit_s),
                 'mip_rel_gap': 0.0, **_FAST_MIP_OPTIONS}
      if self.threads is not None:
        options['threads'] = self.threads
      for name, value in options.items():
        if highs.setOptionValue(name, value) == highspy.HighsStatus.kError:
          raise ValueError(f'HiGHS rejected option {name}={value!r}.')
      self._highs = highs
    return self._highs


def solve_greedy(cost: CostModel, max_level: int, levels: np.ndarray,
                 predicted_tokens: np.ndarray, resident: np.ndarray, capacity: int,
                 transfer_budget: int) -> BalancerResult:
  """Choose residency with the greedy heuristic of `_greedy_counts`, without HiGHS."""
  start = time.perf_counter()
  levels, predicted_tokens, resident = _validate_inputs(
      levels, predicted_tokens, resident, capacity, transfer_budget, max_level)
  groups = _group_experts(cost, levels, predicted_tokens, resident)
  keep = _decode(groups, _greedy_counts(groups, levels.shape[0], capacity, transfer_budget),
                 levels.shape)
  return _result(cost, levels, predicted_tokens, resident, keep, 'greedy', 'greedy', max_level,
                 start)


def _validate_inputs(levels: np.ndarray, predicted_tokens: np.ndarray, resident: np.ndarray,
                     capacity: int, transfer_budget: int, max_level: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  levels = np.asarray(levels)
  predicted_tokens = np.asarray(predicted_tokens, dtype=np.float64)
  resident = np.asarray(resident)
  if levels.ndim != 2 or levels.size == 0:
    raise ValueError(f'levels must be a non-empty [L, E] array, got shape {levels.shape}.')
  for name, array in (('predicted_tokens', predicted_tokens), ('resident', resident)):
    if array.shape != levels.shape:
      raise ValueError(f'{name} must have the shape of levels {levels.shape}, got '
                       f'{array.shape}.')
  if not np.issubdtype(levels.dtype, np.integer):
    raise ValueError(f'levels must be integers, got dtype {levels.dtype}.')
  if levels.min() < 0 or levels.max() > max_level:
    raise ValueError(f'levels must be in [0, {max_level}], got values in '
                     f'[{levels.min()}, {levels.max()}].')
  if resident.dtype != np.bool_:
    raise ValueError(f'resident must be a bool mask, got dtype {resident.dtype}.')
  if not np.all(np.isfinite(predicted_tokens)) or predicted_tokens.min() < 0:
    raise ValueError('predicted_tokens must be finite and >= 0, got values in '
                     f'[{predicted_tokens.min()}, {predicted_tokens.max()}].')
  for name, value in (('capacity', capacity), ('transfer_budget', transfer_budget)):
    if int(value) != value or value < 0:
      raise ValueError(f'{name} must be a non-negative integer, got {value}.')
  return levels.astype(np.int64), predicted_tokens, resident


def _group_experts(cost: CostModel, levels: np.ndarray, predicted_tokens: np.ndarray,
                   resident: np.ndarray) -> _Groups:
  """Group the used experts so that the members of a group cost the same."""
  num_experts = levels.shape[1]
  flat_ids = np.flatnonzero(predicted_tokens > 0)
  layer = flat_ids // num_experts
  level = levels.ravel()[flat_ids]
  is_resident = resident.ravel()[flat_ids]
  tokens = predicted_tokens.ravel()[flat_ids]

  # lexsort sorts by the last key first. flat_ids as the first key orders each group by id.
  order = np.lexsort((flat_ids, tokens, is_resident, level, layer))
  layer, level, is_resident, tokens = layer[order], level[order], is_resident[order], tokens[order]
  starts_group = np.ones(len(order), dtype=bool)
  starts_group[1:] = ((np.diff(layer) != 0) | (np.diff(level) != 0)
                      | (is_resident[1:] != is_resident[:-1]) | (np.diff(tokens) != 0))
  group_starts = np.flatnonzero(starts_group)
  member_group = np.cumsum(starts_group) - 1
  size = np.diff(np.append(group_starts, len(order)))

  group_tokens = tokens[group_starts]
  group_resident = is_resident[group_starts]
  device_ms = (cost.device_fixed_ms + cost.device_per_token_ms * group_tokens
               + np.where(group_resident, 0.0, cost.transfer_ms))
  cpu_ms = cost.cpu_fixed_ms + cost.cpu_per_token_ms * group_tokens
  return _Groups(layer=layer[group_starts], resident=group_resident, size=size,
                 device_ms=device_ms, cpu_ms=cpu_ms, member_flat_ids=flat_ids[order],
                 member_rank=np.arange(len(order)) - group_starts[member_group],
                 member_group=member_group)


def _build_lp(groups: _Groups, num_layers: int, capacity: int,
              transfer_budget: int) -> highspy.HighsLp:
  """Build the grouped integer program as column-wise arrays.

  Columns: y_g for each group (integer), then z_l for each layer (continuous).
  Rows: 2l is z_l - sum_g device_ms_g y_g >= 0, 2l + 1 is z_l + sum_g cpu_ms_g y_g >= the CPU
  time of the whole layer, then the capacity row and the transfer-budget row.
  """
  num_groups = len(groups.size)
  capacity_row = 2 * num_layers
  budget_row = capacity_row + 1

  # Entries of the group columns: device row, CPU row, capacity row, and for non-resident
  # groups the budget row. The budget entry goes last so row indices rise within a column.
  per_column = np.where(groups.resident, 3, 4)
  group_rows = np.stack([2 * groups.layer, 2 * groups.layer + 1,
                         np.full(num_groups, capacity_row), np.full(num_groups, budget_row)],
                        axis=1)
  group_values = np.stack([-groups.device_ms, groups.cpu_ms, np.ones(num_groups),
                           np.ones(num_groups)], axis=1)
  in_column = np.arange(4)[None, :] < per_column[:, None]
  makespan_rows = np.stack([2 * np.arange(num_layers), 2 * np.arange(num_layers) + 1], axis=1)

  lp = highspy.HighsLp()
  lp.num_col_ = num_groups + num_layers
  lp.num_row_ = 2 * num_layers + 2
  lp.col_cost_ = np.concatenate([np.zeros(num_groups), np.ones(num_layers)])
  lp.col_lower_ = np.zeros(num_groups + num_layers)
  lp.col_upper_ = np.concatenate([groups.size.astype(np.float64),
                                  np.full(num_layers, highspy.kHighsInf)])

  layer_cpu_ms = np.bincount(groups.layer, weights=groups.size * groups.cpu_ms,
                             minlength=num_layers)
  row_lower = np.zeros(lp.num_row_)
  row_lower[1:capacity_row:2] = layer_cpu_ms
  row_lower[capacity_row:] = -highspy.kHighsInf
  row_upper = np.full(lp.num_row_, highspy.kHighsInf)
  row_upper[capacity_row] = capacity
  row_upper[budget_row] = transfer_budget
  lp.row_lower_ = row_lower
  lp.row_upper_ = row_upper

  lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
  lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(per_column),
                                        per_column.sum() + 2 * np.arange(1, num_layers + 1)])
  lp.a_matrix_.index_ = np.concatenate([group_rows[in_column], makespan_rows.ravel()])
  lp.a_matrix_.value_ = np.concatenate([group_values[in_column], np.ones(2 * num_layers)])
  lp.integrality_ = ([highspy.HighsVarType.kInteger] * num_groups
                     + [highspy.HighsVarType.kContinuous] * num_layers)
  return lp


def _greedy_counts(groups: _Groups, num_layers: int, capacity: int,
                   transfer_budget: int) -> np.ndarray:
  """Choose kept counts per group greedily. A heuristic with no optimality guarantee.

  Steps:
    1. Start with every used expert on the CPU.
    2. Visit groups by CPU time saved per slot, highest first, resident groups first on ties
       because they need no transfer.
    3. In each group keep the count, within the remaining capacity and budget, that minimises
       max(device side, CPU side) of its layer. That layer time is convex in the count, so
       the best count is next to where the two sides cross.
  Every step keeps or lowers its layer's time, so the result is never worse than all-CPU.
  """
  device = np.zeros(num_layers)
  cpu = np.bincount(groups.layer, weights=groups.size * groups.cpu_ms, minlength=num_layers)
  counts = np.zeros(len(groups.size), dtype=np.int64)
  slots_left = capacity
  budget_left = transfer_budget

  for g in np.lexsort((~groups.resident, -groups.cpu_ms)):
    limit = min(groups.size[g], slots_left)
    if not groups.resident[g]:
      limit = min(limit, budget_left)
    if limit <= 0:
      continue
    layer = groups.layer[g]
    best = _best_count(device[layer], cpu[layer], groups.device_ms[g], groups.cpu_ms[g], limit)
    if best == 0:
      continue
    counts[g] = best
    device[layer] += best * groups.device_ms[g]
    cpu[layer] -= best * groups.cpu_ms[g]
    slots_left -= best
    if not groups.resident[g]:
      budget_left -= best
  return counts


def _best_count(device: float, cpu: float, device_ms: float, cpu_ms: float, limit: int) -> int:
  """Return the count in [0, limit] that minimises max(device + n d, cpu - n c), lowest first."""
  if device_ms + cpu_ms <= 0:
    return 0
  crossing = (cpu - device) / (device_ms + cpu_ms)
  candidates = {0, limit, min(limit, max(0, math.floor(crossing))),
                min(limit, max(0, math.ceil(crossing)))}
  best, best_time = 0, max(device, cpu)
  for n in sorted(candidates):
    layer_time = max(device + n * device_ms, cpu - n * cpu_ms)
    if layer_time < best_time - 1e-12:
      best, best_time = n, layer_time
  return best


def _decode(groups: _Groups, counts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Keep the first `counts[g]` members (lowest ids) of every group, as an [L, E] mask."""
  keep = np.zeros(shape[0] * shape[1], dtype=bool)
  kept_members = groups.member_rank < counts[groups.member_group]
  keep[groups.member_flat_ids[kept_members]] = True
  return keep.reshape(shape)


def _check_limits(keep: np.ndarray, resident: np.ndarray, capacity: int,
                  transfer_budget: int) -> str | None:
  """Return why the mask breaks capacity or the transfer budget, or None if it fits both."""
  kept = int(keep.sum())
  copied = int(np.sum(keep & ~resident))
  if kept > capacity:
    return f'HiGHS answer keeps {kept} experts, over capacity {capacity}'
  if copied > transfer_budget:
    return f'HiGHS answer copies {copied} experts, over transfer_budget {transfer_budget}'
  return None


def _result(cost: CostModel, levels: np.ndarray, predicted_tokens: np.ndarray,
            resident: np.ndarray, keep: np.ndarray, solver: str, status: str,
            max_level: int, start: float) -> BalancerResult:
  """Derive the thresholds from the mask and build the result."""
  # One above the highest level with a dropped expert, 0 where the layer keeps every expert.
  thresholds = np.max(np.where(keep, -1, levels), axis=1) + 1
  keep_counts = keep.sum(axis=1)
  thresholds[keep_counts == 0] = max_level + 1
  threshold_shaped = np.all(keep == (levels >= thresholds[:, None]), axis=1)
  return BalancerResult(
      thresholds=thresholds,
      keep_counts=keep_counts,
      resident_target=keep,
      threshold_shaped=threshold_shaped,
      objective_ms=pass_time_ms(cost, predicted_tokens, resident, keep),
      solver=solver,
      status=status,
      solve_time_ms=(time.perf_counter() - start) * 1e3)
