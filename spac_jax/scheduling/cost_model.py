"""Cost-model constants of the workload balancer: from a hardware profile or measured here.

A hardware profile gives throughputs; the per-expert constants follow from one expert's size
(bytes of its three projections) and work (2 * 3 * d_model * expert_dim FLOPs per token):
  device_fixed = launch overhead + bytes / device memory bandwidth
  device_per_token = flops / device throughput
  cpu_fixed = bytes / CPU memory bandwidth      (streaming the weights from RAM)
  cpu_per_token = flops / CPU throughput
  transfer = bytes / host link bandwidth
Measuring instead times the engine's own kernels on the machine at hand. On a CPU-only
machine both "sides" are the same CPU, so measured constants describe that machine only.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spac_jax.offload import experts
from spac_jax.offload.cache import ExpertCache
from spac_jax.scheduling.balancer import CostModel


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  """Throughputs of an accelerator, its host link and the host CPU."""

  name: str
  device_tflops: float
  device_bandwidth_gbps: float
  link_gbps: float
  cpu_gflops: float
  cpu_bandwidth_gbps: float
  launch_us: float  # Fixed accelerator cost per expert, beyond reading its weights.

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == 'name':
        continue
      minimum_ok = value >= 0 if field.name == 'launch_us' else value > 0
      if not (isinstance(value, (int, float)) and minimum_ok):
        bound = '>= 0' if field.name == 'launch_us' else '> 0'
        raise ValueError(f'Hardware profile {self.name!r}: {field.name} must be {bound}, got '
                         f'{value!r}.')

  def cost_model(self, expert_bytes: int, expert_flops_per_token: int) -> CostModel:
    """Per-expert constants of an expert of the given size, in milliseconds."""
    return CostModel(
        device_fixed_ms=self.launch_us * 1e-3 + 1e3 * expert_bytes / (self.device_bandwidth_gbps * 1e9),
        device_per_token_ms=1e3 * expert_flops_per_token / (self.device_tflops * 1e12),
        cpu_fixed_ms=1e3 * expert_bytes / (self.cpu_bandwidth_gbps * 1e9),
        cpu_per_token_ms=1e3 * expert_flops_per_token / (self.cpu_gflops * 1e9),
        transfer_ms=1e3 * expert_bytes / (self.link_gbps * 1e9),
        source='profile')


def profile_from_config(config: ml_collections.ConfigDict) -> HardwareProfile:
  return HardwareProfile(**config.to_dict())


def _median_ms(function, repeats: int) -> float:
  jax.block_until_ready(function())  # Compile and warm up outside the timing.
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(function())
    times.append(time.perf_counter() - started)
  return 1e3 * float(np.median(times))


def measure_cost_model(cache: ExpertCache, window: int, repeats: int = 20) -> CostModel:
  """Time one expert's device compute, CPU compute and slot copy on this machine.

  Fixed and per-token parts come from windows of 1 and `window` tokens. The device and copy
  timings need at least one cache slot. Without one, the device side is given the CPU
  side's costs.
  """
  store = cache.store
  host = store.layers[0].as_tuple()
  chosen = jnp.zeros(1, jnp.int32)

  def routed(tokens: int):
    x = jnp.ones((tokens, store.d_model), store.dtype)
    return x, jnp.ones((tokens, 1), jnp.float32), jnp.zeros((tokens, 1), jnp.int32)

  def per_token_fit(run) -> tuple[float, float]:
    one, many = _median_ms(lambda: run(1), repeats), _median_ms(lambda: run(window), repeats)
    per_token = max(0.0, (many - one) / max(window - 1, 1))
    return max(0.0, one - per_token), per_token

  cpu_fixed, cpu_per_token = per_token_fit(
      lambda tokens: experts.host_experts(*host, *routed(tokens), chosen))
  if cache.num_slots == 0:
    return CostModel(cpu_fixed, cpu_per_token, cpu_fixed, cpu_per_token, cpu_fixed, 'measured')
  device_fixed, device_per_token = per_token_fit(
      lambda tokens: experts.device_experts(cache.gate, cache.up, cache.down, *routed(tokens),
                                            chosen, chosen))

  with cache.lock:
    owner = cache.owner[0]
    bytes_written = cache.bytes_written
    cache.evict(0)

    def copy():
      cache.write(0, 0, 0)
      cache.evict(0)
      return cache.gate

    transfer = _median_ms(copy, repeats)
    if owner is not None:
      cache.write(0, *owner)
    cache.bytes_written = bytes_written  # Calibration copies are not decoding traffic.
  return CostModel(device_fixed, device_per_token, cpu_fixed, cpu_per_token, transfer,
                   'measured')
