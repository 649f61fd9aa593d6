"""Host expert store and the device expert cache.

The store keeps every routed expert of every MoE layer in `pinned_host` memory, stacked per
layer. The cache is a fixed number of slots in `device` memory shared by all MoE layers. A
slot contains one (layer, expert) at a time. A jitted, donating slot write overwrites it in
place, so no slot write allocates a new cache.
"""

import dataclasses
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from spac_jax.offload import memory


@dataclasses.dataclass
class ExpertStacks:
  """One layer's routed experts: gate and up [E, D, F], down [E, F, D]."""

  gate: jax.Array
  up: jax.Array
  down: jax.Array

  def as_tuple(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.gate, self.up, self.down


class HostExpertStore:
  """Every routed expert of the target, in pinned host memory."""

  def __init__(self, layers: list[ExpertStacks]):
    if not layers:
      raise ValueError('HostExpertStore needs at least one MoE layer.')
    for index, stacks in enumerate(layers):
      for array in stacks.as_tuple():
        if memory.memory_kind(array) != memory.PINNED_HOST:
          raise ValueError(f'Expert weights of layer {index} are in memory kind '
                           f'{memory.memory_kind(array)!r}; place them in pinned_host.')
    self.layers = layers
    self.num_layers = len(layers)
    self.num_experts, self.d_model, self.expert_dim = layers[0].gate.shape
    self.dtype = layers[0].gate.dtype
    self.bytes_per_expert = sum(a[0].nbytes for a in layers[0].as_tuple())

  @property
  def total_experts(self) -> int:
    return self.num_layers * self.num_experts


@partial(jax.jit, donate_argnums=(0, 1, 2))
def _write_slot(slot_gate, slot_up, slot_down, host_gate, host_up, host_down, expert, slot):
  """Copy one expert from its host stacks into cache slot `slot`, in place."""
  device = memory.sharding(memory.DEVICE)
  new = []
  for cache_array, host_array in ((slot_gate, host_gate), (slot_up, host_up),
                                  (slot_down, host_down)):
    weights = jax.device_put(jax.lax.dynamic_index_in_dim(host_array, expert, keepdims=False),
                             device)
    new.append(jax.lax.dynamic_update_index_in_dim(cache_array, weights, slot, 0))
  return tuple(new)


class ExpertCache:
  """`num_slots` device slots, each holding one (layer, expert) or nothing.

  The slot table (`owner`, `slot_of`) is plain Python guarded by `lock`, so a prefetch thread
  and the decoding thread can share the cache. `write` is the only way weights enter a slot.
  """

  def __init__(self, store: HostExpertStore, num_slots: int):
    if num_slots < 0:
      raise ValueError(f'num_slots must be >= 0, got {num_slots}.')
    self.store = store
    self.num_slots = num_slots
    device = memory.sharding(memory.DEVICE)
    shape_in = (num_slots, store.d_model, store.expert_dim)
    shape_out = (num_slots, store.expert_dim, store.d_model)
    self.gate = jax.device_put(jnp.zeros(shape_in, store.dtype), device)
    self.up = jax.device_put(jnp.zeros(shape_in, store.dtype), device)
    self.down = jax.device_put(jnp.zeros(shape_out, store.dtype), device)
    self.owner: list[tuple[int, int] | None] = [None] * num_slots
    self.slot_of: dict[tuple[int, int], int] = {}
    self.lock = threading.RLock()
    self.bytes_written = 0

  def free_slots(self) -> list[int]:
    with self.lock:
      return [slot for slot, owner in enumerate(self.owner) if owner is None]

  def is_resident(self, layer: int, expert: int) -> bool:
    return (layer, expert) in self.slot_of

  def residency(self) -> np.ndarray:
    """[L, E] bool: which experts are in the cache."""
    mask = np.zeros((self.store.num_layers, self.store.num_experts), bool)
    with self.lock:
      for layer, expert in self.slot_of:
        mask[layer, expert] = True
    return mask

  def write(self, slot: int, layer: int, expert: int) -> int:
    """Copy (layer, expert) from the host store into `slot`, evicting its owner.

    Returns:
      Bytes copied host to device.
    """
    if not 0 <= slot < self.num_slots:
      raise IndexError(f'Cache slot {slot} out of range [0, {self.num_slots}).')
    with self.lock:
      if (layer, expert) in self.slot_of:
        raise ValueError(f'Expert {expert} of layer {layer} is already in slot '
                         f'{self.slot_of[(layer, expert)]}.')
      self.evict(slot)
      stacks = self.store.layers[layer]
      self.gate, self.up, self.down = _write_slot(self.gate, self.up, self.down,
                                                  *stacks.as_tuple(), jnp.int32(expert),
                                                  jnp.int32(slot))
      self.owner[slot] = (layer, expert)
      self.slot_of[(layer, expert)] = slot
      self.bytes_written += self.store.bytes_per_expert
    return self.store.bytes_per_expert

  def evict(self, slot: int) -> None:
    """Mark `slot` free (its weights stay until overwritten)."""
    with self.lock:
      owner = self.owner[slot]
      if owner is not None:
        del self.slot_of[owner]
        self.owner[slot] = None
