"""Prefetch engine: hand-computed eviction order and a seeded concurrency stress test."""

import random
import threading
import time

import numpy as np
import pytest

from spac_jax.offload.cache import ExpertCache
from spac_jax.scheduling.engine import PrefetchEngine, PrefetchRequest

from offload_test import make_store

K = 5


@pytest.fixture
def store():
  return make_store(num_layers=2)


def assert_slots_hold_owners(cache):
  """Every occupied slot's weights equal its owner's host weights."""
  for slot, owner in enumerate(cache.owner):
    if owner is None:
      continue
    layer, expert = owner
    for cached, stacked in zip((cache.gate, cache.up, cache.down),
                               cache.store.layers[layer].as_tuple()):
      np.testing.assert_array_equal(np.asarray(cached[slot]), np.asarray(stacked[expert]))


def test_higher_level_served_first_and_evicts_lower(store):
  cache = ExpertCache(store, num_slots=2)
  engine = PrefetchEngine(cache, K, num_layers=2)
  try:
    engine.submit([PrefetchRequest(0, 1, level=2), PrefetchRequest(0, 2, level=4)])
    assert engine.wait_idle(5)
    assert sorted(cache.slot_of) == [(0, 1), (0, 2)]
    # A level-3 request evicts the level-2 expert, not the level-4 one.
    engine.submit([PrefetchRequest(1, 3, level=3)])
    assert engine.wait_idle(5)
    assert sorted(cache.slot_of) == [(0, 2), (1, 3)]
    assert engine.stats.wasted_prefetches == 1  # (0, 1) left without being used.
    # A level-1 request finds no slot below its level and is dropped.
    engine.submit([PrefetchRequest(1, 4, level=1)])
    assert engine.wait_idle(5)
    assert not cache.is_resident(1, 4)
    assert engine.stats.dropped_no_slot == 1
    assert_slots_hold_owners(cache)
  finally:
    engine.close()


def test_frozen_experts_survive_until_layer_finishes(store):
  cache = ExpertCache(store, num_slots=1)
  engine = PrefetchEngine(cache, K, num_layers=2)
  try:
    engine.submit([PrefetchRequest(0, 5, level=1)])
    assert engine.wait_idle(5)
    engine.start_layer(0, np.array([5]))
    engine.submit([PrefetchRequest(1, 2, level=K)])
    assert engine.wait_idle(5)
    assert cache.is_resident(0, 5)  # Frozen at level K + 1: even level K cannot evict it.
    engine.finish_layer(0)
    engine.submit([PrefetchRequest(1, 2, level=1)])
    assert engine.wait_idle(5)
    assert cache.owner == [(1, 2)]  # Dropped to level 0 after its layer.
    assert engine.stats.wasted_prefetches == 0  # (0, 5) was used before its eviction.
  finally:
    engine.close()


def test_stale_requests_dropped_when_layer_starts(store):
  cache = ExpertCache(store, num_slots=0)
  engine = PrefetchEngine(cache, K, num_layers=2)
  try:
    with engine.condition:  # Hold the worker off while queueing.
      engine.submit([PrefetchRequest(1, e, level=3) for e in range(4)])
      engine.start_layer(1, np.array([0]))
    assert engine.stats.dropped_stale == 4
    assert engine.wait_idle(5)
  finally:
    engine.close()


def test_worker_failure_surfaces_in_decoding_thread(store):
  cache = ExpertCache(store, num_slots=1)
  engine = PrefetchEngine(cache, K, num_layers=2)

  def failing_write(*args):
    raise OSError('host link down')

  cache.write = failing_write
  engine.submit([PrefetchRequest(0, 1, level=2)])
  assert engine.wait_idle(5)
  with pytest.raises(RuntimeError, match='host link down'):
    engine.start_layer(0, np.array([1]))
  engine.close()


@pytest.mark.parametrize('seed', range(4))
def test_random_schedules_keep_invariants(store, seed):
  rng = random.Random(seed)
  num_slots = rng.choice([0, 1, 3, 6])
  cache = ExpertCache(store, num_slots)
  engine = PrefetchEngine(cache, K, num_layers=2, wait_timeout_s=20)
  violations = []
  stop = threading.Event()

  def check_capacity():
    while not stop.is_set():
      with cache.lock:
        if len(cache.slot_of) > num_slots:
          violations.append(f'{len(cache.slot_of)} experts in {num_slots} slots')
      time.sleep(0.0005)

  checker = threading.Thread(target=check_capacity)
  checker.start()
  try:
    for _ in range(40):
      engine.submit([PrefetchRequest(rng.randrange(2), rng.randrange(8), rng.randint(1, K))
                     for _ in range(rng.randint(1, 6))])
      engine.set_levels(np.array([[rng.randint(0, K) for _ in range(8)] for _ in range(2)]))
      layer = rng.randrange(2)
      needed = np.array(sorted(rng.sample(range(8), rng.randint(1, 4))))
      engine.start_layer(layer, needed)
      with cache.lock:
        frozen = {(layer, int(e)): cache.slot_of[(layer, int(e))] for e in needed
                  if cache.is_resident(layer, int(e))}
      time.sleep(rng.random() * 0.002)  # The layer "computes" while the worker runs.
      with cache.lock:
        for key, slot in frozen.items():
          if cache.owner[slot] != key:
            violations.append(f'frozen {key} evicted from slot {slot}')
      engine.finish_layer(layer)
    assert engine.wait_idle(20)
    assert_slots_hold_owners(cache)
    # Shutdown with requests still queued returns promptly.
    with engine.condition:
      engine.submit([PrefetchRequest(0, e, level=K) for e in range(8)])
  finally:
    stop.set()
    checker.join()
    started = time.perf_counter()
    engine.close()
  assert time.perf_counter() - started < 5
  assert not violations, violations[:5]
