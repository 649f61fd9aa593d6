"""The interface every expert cache policy implements.

The offloaded target calls, for each MoE layer of each forward pass:
  1. `before_layer(layer, needed)`: the policy may copy experts into the cache on the
     critical path and returns which ones it copied (counted as misses). The layer then
     computes every needed expert that is resident from its cache slot, the rest on the CPU.
  2. `after_layer(layer, needed)`: the policy may update its state or the cache.
and after the last layer, `after_pass(counts, window)` with the pass's activation counts.
"""

import abc
import dataclasses
from typing import Any, ClassVar

import ml_collections
import numpy as np

from spac_jax.offload.cache import ExpertCache
from spac_jax.offload.stats import OffloadStats


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
  """Run settings a policy may need beyond the cache."""

  next_window: int = 1  # Tokens of a decode pass: draft_len + 1, or 1 when autoregressive.
  spac: ml_collections.ConfigDict | None = None  # The `spac` config section.


class CachePolicy(abc.ABC):
  """Decides which experts are in the device cache."""

  name: ClassVar[str]

  def __init__(self, cache: ExpertCache, stats: OffloadStats, options: PolicyOptions):
    self.cache = cache
    self.stats = stats
    self.options = options

  @classmethod
  def num_slots(cls, requested_slots: int, total_experts: int) -> int:
    """Cache slots this policy runs with, given the config's request."""
    del total_experts
    return requested_slots

  def load(self, layer: int, expert: int, slot: int) -> None:
    """Copy an expert into `slot`, counting the bytes against `layer`."""
    self.stats.host_to_device_bytes[layer] += self.cache.write(slot, layer, expert)

  @abc.abstractmethod
  def before_layer(self, layer: int, needed: np.ndarray) -> list[int]:
    """Act before `layer` computes the distinct experts `needed` (int array).

    Returns:
      The experts this call copied into the cache (on the critical path).
    """

  @abc.abstractmethod
  def after_layer(self, layer: int, needed: np.ndarray) -> None:
    """Act after `layer` computed."""

  def after_pass(self, counts: np.ndarray, window: int) -> None:
    """Observe a finished forward pass: counts [L, E] tokens per expert, W tokens."""
    del counts, window

  def results(self) -> dict[str, Any]:
    """Policy-specific figures for results.json."""
    return {}

  def close(self) -> None:
    """Release threads or other resources."""
