"""MoE-SpAc: utility levels from each pass's routing, a HiGHS residency plan, async prefetch.

After every target forward pass:
  1. The Speculative Utility Estimator turns the pass's activation counts into levels.
  2. The Heterogeneous Workload Balancer chooses which experts should be resident for the
     next pass (capacity = cache slots, at most `transfer_budget` copies), expressed as a
     per-layer utility threshold and a keep mask.
  3. The prefetch engine re-levels the cache: kept experts get their utility level and the
     rest get 0, so they are evicted first. It queues a request per kept expert that is not
     resident, and its worker copies them while the next pass runs.
During a pass, each layer freezes its resident experts (`before_layer`) and releases them to
level 0 afterwards (`after_layer`). Misses are computed on the CPU, never fetched on the
critical path.
"""

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from spac_jax.policies.base import CachePolicy
from spac_jax.scheduling import cost_model
from spac_jax.scheduling.balancer import WorkloadBalancer
from spac_jax.scheduling.engine import PrefetchEngine, PrefetchRequest
from spac_jax.scheduling.utility import UtilityConfig, UtilityEstimator


def default_config() -> ml_collections.ConfigDict:
  """Build the `spac` config section with its defaults."""
  config = ml_collections.ConfigDict()
  config.levels = 5  # K: utility levels 0..K.
  config.inertia = True  # Move a level at most one step per pass (off: jump to the target).
  config.calibration = True  # Normalise demand by window size, calibrate level boundaries.
  config.transfer_budget = -1  # Max experts prefetched per pass; -1 means the cache size.
  # Passes a copied expert is expected to serve: the balancer charges transfer_ms divided by
  # it. 1 charges every copy in full to the next pass.
  config.transfer_amortization = 1.0
  config.solver_time_limit_ms = 20.0  # HiGHS time limit; past it the greedy plan is used.
  config.cost_model = 'profile'  # 'profile' (below) or 'measure' (timed at start-up here).
  config.profile = ml_collections.ConfigDict()  # Hardware the balancer plans for.
  config.profile.name = 'laptop_gpu_pcie4'
  config.profile.device_tflops = 40.0
  config.profile.device_bandwidth_gbps = 500.0
  config.profile.link_gbps = 25.0  # PCIe 4.0 x16, host to device.
  config.profile.cpu_gflops = 500.0
  config.profile.cpu_bandwidth_gbps = 60.0
  # The engine computes all resident experts of a layer in one kernel, so an expert adds no
  # launch of its own.
  config.profile.launch_us = 0.0
  return config


class SpacPolicy(CachePolicy):
  """The full MoE-SpAc method: utility estimator, HiGHS balancer, asynchronous engine."""

  name = 'spac'

  def __init__(self, cache, stats, options):
    super().__init__(cache, stats, options)
    config = options.spac if options.spac is not None else default_config()
    store = cache.store
    self.estimator = UtilityEstimator(
        store.num_layers, store.num_experts,
        UtilityConfig(levels=config.levels, inertia=config.inertia,
                      calibration=config.calibration))
    self.cost = self._cost_model(config)
    planning_cost = dataclasses.replace(
        self.cost, transfer_ms=self.cost.transfer_ms / config.transfer_amortization)
    self.balancer = WorkloadBalancer(planning_cost, config.levels,
                                     time_limit_s=config.solver_time_limit_ms / 1e3)
    self.transfer_budget = (cache.num_slots if config.transfer_budget < 0 else
                            config.transfer_budget)
    self.engine = PrefetchEngine(cache, config.levels, store.num_layers,
                                 bytes_counter=stats.host_to_device_bytes)
    self.solve_times_ms: list[float] = []
    self.solvers: dict[str, int] = {}
    self.thresholds_sum = np.zeros(store.num_layers)
    self.last_thresholds = np.full(store.num_layers, config.levels + 1)
    logging.info('spac: cost model (%s) %s', self.cost.source, self.cost)

  def _cost_model(self, config):
    store = self.cache.store
    if config.cost_model == 'measure':
      return cost_model.measure_cost_model(self.cache, self.options.next_window)
    if config.cost_model != 'profile':
      raise ValueError(f"config.spac.cost_model={config.cost_model!r} is invalid; use "
                       "'profile' or 'measure'.")
    flops_per_token = 2 * 3 * store.d_model * store.expert_dim
    return cost_model.profile_from_config(config.profile).cost_model(store.bytes_per_expert,
                                                                     flops_per_token)

  def before_layer(self, layer: int, needed: np.ndarray) -> list[int]:
    self.engine.start_layer(layer, needed)
    return []  # Misses go to the CPU; only the worker copies, off the critical path.

  def after_layer(self, layer: int, needed: np.ndarray) -> None:
    del needed
    self.engine.finish_layer(layer)

  def after_pass(self, counts: np.ndarray, window: int) -> None:
    self.estimator.observe(counts, window)
    levels = self.estimator.levels
    resident = self.cache.residency()
    plan = self.balancer.solve(levels, self.estimator.predicted_tokens(self.options.next_window),
                               resident, self.cache.num_slots, self.transfer_budget)
    self.solve_times_ms.append(plan.solve_time_ms)
    self.solvers[plan.solver] = self.solvers.get(plan.solver, 0) + 1
    self.thresholds_sum += plan.thresholds
    self.last_thresholds = plan.thresholds

    keep = plan.resident_target
    self.engine.set_levels(np.where(keep, levels, 0))
    layers, experts = np.nonzero(keep & ~resident)
    order = np.argsort(-levels[layers, experts], kind='stable')
    self.engine.submit([PrefetchRequest(int(layers[i]), int(experts[i]),
                                        max(1, int(levels[layers[i], experts[i]])))
                        for i in order])

  def results(self) -> dict:
    times = np.asarray(self.solve_times_ms) if self.solve_times_ms else np.zeros(1)
    engine = self.engine.stats
    return {
        'solver_time_ms': {'mean': float(times.mean()), 'p99': float(np.percentile(times, 99))},
        'solver_calls': dict(self.solvers),
        'prefetches': engine.prefetches,
        'wasted_prefetches': engine.wasted_prefetches,
        'dropped_stale_prefetches': engine.dropped_stale,
        'dropped_no_slot_prefetches': engine.dropped_no_slot,
        'transfer_stall_ms': 1e3 * engine.transfer_stall_s,
        'per_layer_threshold_mean': (self.thresholds_sum / max(len(self.solve_times_ms), 1)
                                     ).round(3).tolist(),
        'per_layer_threshold_last': [int(t) for t in self.last_thresholds],
        'cost_model': {'source': self.cost.source, **{
            name: getattr(self.cost, name) for name in (
                'device_fixed_ms', 'device_per_token_ms', 'cpu_fixed_ms', 'cpu_per_token_ms',
                'transfer_ms')}},
    }

  def close(self) -> None:
    self.engine.close()
