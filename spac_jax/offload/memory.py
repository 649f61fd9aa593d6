"""Memory kinds: the one place that decides where an array lives.

A device exposes memory kinds; `device` is accelerator memory and `pinned_host` is page-locked
host RAM the accelerator can copy from directly. The memory kind is part of an array's type
inside `jit`: an op mixing a `pinned_host` operand with a `device` one is rejected, also on CPU,
so a forgotten move fails loudly instead of silently copying.

On a CPU-only machine every kind is in the same RAM. The pipeline runs and is correct, but
its transfer times tell nothing about a real host link.
"""

import jax
from jax.experimental.compute_on import compute_on
from jax.sharding import SingleDeviceSharding

DEVICE = 'device'
PINNED_HOST = 'pinned_host'


def default_device() -> jax.Device:
  return jax.devices()[0]


def sharding(memory_kind: str, device: jax.Device | None = None) -> SingleDeviceSharding:
  """Single-device sharding on `device` (default: the first device) in `memory_kind`."""
  device = device or default_device()
  kinds = {memory.kind for memory in device.addressable_memories()}
  if memory_kind not in kinds:
    raise ValueError(f'Device {device} has no memory kind {memory_kind!r}; it has {sorted(kinds)}.')
  return SingleDeviceSharding(device, memory_kind=memory_kind)


def to_device(tree):
  """Place every array of a pytree in device memory."""
  return jax.device_put(tree, sharding(DEVICE))


def to_host(tree):
  """Place every array of a pytree in pinned host memory."""
  return jax.device_put(tree, sharding(PINNED_HOST))


def on_host():
  """Context manager: ops traced inside run on the host CPU over `pinned_host` operands.

  Wraps `jax.experimental.compute_on('device_host')`. NOTE: jax 0.11 renamed this API
  (`compute_on2` became `compute_on`); this is the only call site to update.
  """
  return compute_on('device_host')


def memory_kind(array: jax.Array) -> str:
  return array.sharding.memory_kind
