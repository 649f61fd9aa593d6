"""LRU: compute misses on the CPU, then bring them into the cache, evicting the least recently
used experts."""

import collections

import numpy as np

from spac_jax.policies.base import CachePolicy


class LRUPolicy(CachePolicy):
  """Least-recently-used expert cache over all MoE layers.

  Recency is updated when a layer uses an expert. Experts the current layer needs are never
  evicted to make room for each other, so with fewer slots than needed experts only the
  first ones (in expert id order) are brought in.
  """

  name = 'lru'

  def __init__(self, cache, stats, options):
    super().__init__(cache, stats, options)
    self.recency: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()

  def touch(self, layer: int, needed: np.ndarray) -> None:
    for expert in needed:
      key = (layer, int(expert))
      if self.cache.is_resident(*key):
        self.recency[key] = None
        self.recency.move_to_end(key)

  def choose_slot(self, protected: set[tuple[int, int]]) -> int | None:
    """Return a free slot, else the least recently used unprotected expert's, else None."""
    free = self.cache.free_slots()
    if free:
      return free[0]
    for key in self.recency:
      if key not in protected:
        del self.recency[key]
        return self.cache.slot_of[key]
    return None

  def bring_in(self, layer: int, needed: np.ndarray) -> list[int]:
    """Copy the non-resident experts of `needed` into the cache while slots allow.

    Returns:
      The experts copied.
    """
    protected = {(layer, int(expert)) for expert in needed}
    copied = []
    for expert in needed:
      expert = int(expert)
      if self.cache.is_resident(layer, expert):
        continue
      slot = self.choose_slot(protected)
      if slot is None:
        break
      self.load(layer, expert, slot)
      self.recency[(layer, expert)] = None
      copied.append(expert)
    return copied

  def before_layer(self, layer: int, needed: np.ndarray) -> list[int]:
    self.touch(layer, needed)
    return []

  def after_layer(self, layer: int, needed: np.ndarray) -> None:
    self.bring_in(layer, needed)
