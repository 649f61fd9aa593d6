"""Reference placement: every routed expert in the device cache, nothing offloaded."""

import numpy as np

from spac_jax.policies.base import CachePolicy


class AllOnDevicePolicy(CachePolicy):
  """Fills one slot per expert once at start-up; later passes never copy or evict."""

  name = 'all_on_device'

  @classmethod
  def num_slots(cls, requested_slots: int, total_experts: int) -> int:
    del requested_slots
    return total_experts

  def __init__(self, cache, stats, options):
    super().__init__(cache, stats, options)
    store = cache.store
    if cache.num_slots < store.total_experts:
      raise ValueError(f'all_on_device needs {store.total_experts} cache slots, got '
                       f'{cache.num_slots}.')
    for layer in range(store.num_layers):
      for expert in range(store.num_experts):
        # Start-up placement is not decoding traffic, so it is not counted in the stats.
        cache.write(layer * store.num_experts + expert, layer, expert)

  def before_layer(self, layer: int, needed: np.ndarray) -> list[int]:
    del layer, needed
    return []

  def after_layer(self, layer: int, needed: np.ndarray) -> None:
    del layer, needed
