"""Expert computation on either side of the host link.

Both kernels compute, for the M experts in `chosen_experts`, every window token's SwiGLU
output and sum it with that token's routing weight for the expert (zero when the token did
not pick it). M is a static bucket (a power of two, see `bucket`), so the kernels compile once
per (window, bucket) pair. Padded entries carry expert id -1, which no token picks.

  * `device_experts` reads the experts from device cache slots.
  * `host_experts` reads them from the `pinned_host` stacks and runs on the host CPU
    (`compute_on('device_host')`), so a missed expert is never copied to the device. Only
    the activations cross the link: x in, the [W, D] partial output back.
"""

import jax
import jax.numpy as jnp

from spac_jax.models.layers import swiglu
from spac_jax.offload import memory


def bucket(count: int, cap: int) -> int:
  """Smallest power of two >= count, capped at `cap` (the window's max distinct experts)."""
  if count > cap:
    raise ValueError(f'{count} experts do not fit a bucket capped at {cap}.')
  size = 1
  while size < count:
    size *= 2
  return min(size, cap)


def _combine(weights: jax.Array, expert_ids: jax.Array, chosen_experts: jax.Array
             ) -> jax.Array:
  """Routing weight of each token for each chosen expert: [W, k] x [W, k] x [M] -> [W, M]."""
  match = expert_ids[:, :, None] == chosen_experts[None, None, :]  # [W, k, M]
  return jnp.sum(match.astype(weights.dtype) * weights[:, :, None], axis=1)


def _mix(x, gate, up, down, combine):
  """Sum over M experts of combine[:, m] * expert_m(x). gate/up: [M, D, F], down: [M, F, D]."""
  per_expert = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(x, gate, up, down)  # [M, W, D]
  return jnp.einsum('wm,mwd->wd', combine.astype(x.dtype), per_expert)


@jax.jit
def device_experts(slot_gate: jax.Array, slot_up: jax.Array, slot_down: jax.Array,
                   x: jax.Array, weights: jax.Array, expert_ids: jax.Array,
                   chosen_experts: jax.Array, chosen_slots: jax.Array) -> jax.Array:
  """Partial MoE output [W, D] of the cached experts.

  Args:
    slot_gate, slot_up, slot_down: the device cache, [S, D, F] / [S, F, D].
    x: [W, D] normalised hidden states; weights, expert_ids: [W, k] routing.
    chosen_experts: [M] expert ids of this layer to compute (-1 = padding).
    chosen_slots: [M] cache slot of each chosen expert (any valid slot for padding).
  """
  combine = _combine(weights, expert_ids, chosen_experts)
  return _mix(x, slot_gate[chosen_slots], slot_up[chosen_slots], slot_down[chosen_slots],
              combine)


@jax.jit
def host_experts(host_gate: jax.Array, host_up: jax.Array, host_down: jax.Array,
                 x: jax.Array, weights: jax.Array, expert_ids: jax.Array,
                 chosen_experts: jax.Array) -> jax.Array:
  """Partial MoE output [W, D] of uncached experts, computed on the host CPU.

  Args:
    host_gate, host_up, host_down: one layer's expert stacks in `pinned_host`, [E, D, F].
    x, weights, expert_ids: as in `device_experts` (device memory).
    chosen_experts: [M] expert ids to compute (-1 = padding).

  Returns:
    The partial output, in `pinned_host` memory.
  """
  # The [W, M] combine matrix and the clamped indices are tiny, so the device builds them and
  # they move over with x. Only the expert gather and matmuls run on the host.
  combine = _combine(weights, expert_ids, chosen_experts)
  index = jnp.maximum(chosen_experts, 0)
  x, combine, index = jax.device_put((x, combine, index), memory.sharding(memory.PINNED_HOST))
  with memory.on_host():
    return _mix(x, host_gate[index], host_up[index], host_down[index], combine)
@jax.jit
def join(h: jax.Array, device_part: jax.Array, host_part: jax.Array) -> jax.Array:
  """Residual add of both partial outputs; h: [1, W, D], parts: [W, D] (host_part on host)."""
  host_part = jax.device_put(host_part, memory.sharding(memory.DEVICE))
  return h + (device_part + host_part)[None]
