"""Expert store, device cache, expert kernels and the LRU/on-demand policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spac_jax.decoding.target import OffloadedTarget
from spac_jax.models.moe import MoEBlock
from spac_jax.models.transformer import Transformer
from spac_jax.offload import experts, memory
from spac_jax.offload.cache import ExpertCache, ExpertStacks, HostExpertStore
from spac_jax.offload.stats import OffloadStats
from spac_jax.policies import make_policy

from conftest import TINY_TARGET


def make_store(num_layers=2, seed=0) -> HostExpertStore:
  layers = []
  for layer in range(num_layers):
    block = MoEBlock(TINY_TARGET, nnx.Rngs(seed + layer))
    layers.append(ExpertStacks(*(memory.to_host(a[...]) for a in (block.gate, block.up,
                                                                  block.down))))
  return HostExpertStore(layers)


def test_store_rejects_device_weights():
  block = MoEBlock(TINY_TARGET, nnx.Rngs(0))
  stacks = ExpertStacks(*(memory.to_device(a[...]) for a in (block.gate, block.up, block.down)))
  with pytest.raises(ValueError, match='pinned_host'):
    HostExpertStore([stacks])


def test_mixing_memory_kinds_fails_inside_jit():
  host = memory.to_host(jnp.ones(4))
  device = memory.to_device(jnp.ones(4))
  with pytest.raises(ValueError, match='memory_space'):
    jax.jit(lambda a, b: a + b)(host, device)


def test_slot_write_copies_expert_weights():
  store = make_store()
  cache = ExpertCache(store, num_slots=3)
  assert cache.gate.sharding.memory_kind == 'device'
  cache.write(2, layer=1, expert=5)
  cache.write(0, layer=0, expert=7)
  cache.write(2, layer=0, expert=1)  # Overwrites (1, 5).
  assert cache.owner == [(0, 7), None, (0, 1)]
  assert not cache.is_resident(1, 5)
  for slot, (layer, expert) in ((0, (0, 7)), (2, (0, 1))):
    for cached, stacked in zip((cache.gate, cache.up, cache.down),
                               store.layers[layer].as_tuple()):
      np.testing.assert_array_equal(cached[slot], stacked[expert])
  assert cache.bytes_written == 3 * store.bytes_per_expert


def test_slot_write_rejects_duplicate_and_bad_slot():
  cache = ExpertCache(make_store(), num_slots=2)
  cache.write(0, 0, 3)
  with pytest.raises(ValueError, match='already in slot 0'):
    cache.write(1, 0, 3)
  with pytest.raises(IndexError, match='slot 5'):
    cache.write(5, 0, 4)


@pytest.mark.parametrize('count, cap, expected', [(1, 8, 1), (3, 8, 4), (5, 8, 8), (6, 6, 6),
                                                  (5, 6, 6)])
def test_bucket_sizes(count, cap, expected):
  assert experts.bucket(count, cap) == expected


def test_device_and_host_kernels_sum_to_dense_reference():
  block = MoEBlock(TINY_TARGET, nnx.Rngs(0))
  store = HostExpertStore([ExpertStacks(*(memory.to_host(a[...]) for a in (
      block.gate, block.up, block.down)))])
  cache = ExpertCache(store, num_slots=4)
  x = jax.random.normal(jax.random.key(0), (5, TINY_TARGET.d_model))
  routing = block.route(x)
  needed = np.unique(np.asarray(routing.expert_ids))
  cached, uncached = needed[:len(needed) // 2], needed[len(needed) // 2:]
  for slot, expert in enumerate(cached):
    cache.write(slot, 0, int(expert))

  chosen = np.full(experts.bucket(len(cached), 8), -1, np.int32)
  chosen[:len(cached)] = cached
  slots = np.zeros_like(chosen)
  slots[:len(cached)] = np.arange(len(cached))
  device_part = experts.device_experts(cache.gate, cache.up, cache.down, x, routing.weights,
                                       routing.expert_ids, jnp.asarray(chosen),
                                       jnp.asarray(slots))
  chosen = np.full(experts.bucket(len(uncached), 8), -1, np.int32)
  chosen[:len(uncached)] = uncached
  host_part = experts.host_experts(*store.layers[0].as_tuple(), x, routing.weights,
                                   routing.expert_ids, jnp.asarray(chosen))
  assert host_part.sharding.memory_kind == 'pinned_host'
  joined = experts.join(jnp.zeros((1,) + x.shape), device_part, host_part)[0]
  np.testing.assert_allclose(joined, block.dense_reference(x), rtol=1e-5, atol=1e-5)


def run_policy(name, slots, schedule):
  """Drive a policy through (layer, needed experts) steps the way the target does."""
  store = make_store()
  cache = ExpertCache(store, slots)
  stats = OffloadStats.zeros(store.num_layers)
  policy = make_policy(name, cache, stats)
  residency = []
  for layer, needed in schedule:
    needed = np.asarray(needed)
    policy.before_layer(layer, needed)
    residency.append(sorted(key for key in cache.slot_of if key[0] == layer))
    policy.after_layer(layer, needed)
  return cache, stats, residency


def test_lru_hand_computed_sequence():
  schedule = [(0, [1, 2]), (1, [3]), (0, [1, 4]), (1, [3, 5])]
  cache, stats, residency = run_policy('lru', 3, schedule)
  # Misses are brought in after the layer computes, so residency during compute lags.
  assert residency == [[], [], [(0, 1), (0, 2)], [(1, 3)]]
  # Step 3 brings (0, 4) in over the least recently used (0, 2). Step 4 touches (1, 3), so
  # (1, 5) replaces (0, 1), now the least recently used.
  assert sorted(cache.slot_of) == [(0, 4), (1, 3), (1, 5)]
  assert stats.host_to_device_bytes.sum() == 5 * cache.store.bytes_per_expert


def test_on_demand_loads_before_compute():
  schedule = [(0, [1, 2]), (1, [3]), (0, [1, 4])]
  cache, _, residency = run_policy('on_demand', 3, schedule)
  assert residency == [[(0, 1), (0, 2)], [(1, 3)], [(0, 1), (0, 4)]]
  assert sorted(cache.slot_of) == [(0, 1), (0, 4), (1, 3)]


def test_on_demand_without_slots_computes_on_cpu():
  cache, stats, residency = run_policy('on_demand', 0, [(0, [1, 2])])
  assert residency == [[]]
  assert stats.host_to_device_bytes.sum() == 0


def test_all_on_device_preloads_every_expert():
  model = Transformer(TINY_TARGET, nnx.Rngs(0))
  target = OffloadedTarget(model, 'all_on_device', requested_slots=0)
  assert target.cache.num_slots == TINY_TARGET.num_layers * TINY_TARGET.num_experts
  assert len(target.cache.slot_of) == target.cache.num_slots
  assert target.stats.host_to_device_bytes.sum() == 0
