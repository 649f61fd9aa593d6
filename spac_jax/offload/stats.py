"""Per-layer counters of the offloaded MoE layers."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class OffloadStats:
  """Counters summed over forward passes.

  A hit or miss is counted once per distinct expert a layer's window needs in one forward
  pass, because one copy or one CPU computation serves every token of the window. It is a
  hit when the expert was in the device cache as the layer started, before the policy acted.
  """

  hits: np.ndarray  # [L] int
  misses: np.ndarray  # [L] int
  host_to_device_bytes: np.ndarray  # [L] int, expert weights copied into the cache.
  cpu_experts: np.ndarray  # [L] int, expert computations run on the CPU.
  device_experts: np.ndarray  # [L] int, expert computations run from cache slots.

  @classmethod
  def zeros(cls, num_layers: int) -> 'OffloadStats':
    return cls(*(np.zeros(num_layers, np.int64) for _ in dataclasses.fields(cls)))

  def summary(self) -> dict:
    needed = self.hits + self.misses
    computed = self.cpu_experts + self.device_experts
    return {
        'expert_hit_rate': _ratio(self.hits.sum(), needed.sum()),
        'host_to_device_bytes': int(self.host_to_device_bytes.sum()),
        'cpu_expert_fraction': _ratio(self.cpu_experts.sum(), computed.sum()),
        'per_layer': [{'hit_rate': _ratio(h, h + m), 'hits': int(h), 'misses': int(m),
                       'host_to_device_bytes': int(b), 'cpu_experts': int(c)}
                      for h, m, b, c in zip(self.hits, self.misses,
                                            self.host_to_device_bytes, self.cpu_experts)],
    }


def _ratio(numerator, denominator) -> float:
  return float(numerator) / float(denominator) if denominator else 0.0
