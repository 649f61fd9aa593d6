"""On-demand loading: copy every missed expert into the cache before the layer computes it."""

import numpy as np

from spac_jax.policies.lru import LRUPolicy


class OnDemandPolicy(LRUPolicy):
  """Fetch misses on the critical path, evicting the least recently used experts.

  When the layer needs more experts than there are slots (or there are no slots), the ones
  that do not fit are computed on the CPU.
  """

  name = 'on_demand'

  def before_layer(self, layer: int, needed: np.ndarray) -> list[int]:
    self.touch(layer, needed)
    return self.bring_in(layer, needed)

  def after_layer(self, layer: int, needed: np.ndarray) -> None:
    del layer, needed
