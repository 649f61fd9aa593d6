"""Asynchronous Execution Engine: utility-ordered prefetch and eviction over the expert cache.

One utility space drives both directions:
  * Prefetch: a multi-level queue, one FIFO per utility level. A worker thread takes the
    request of the highest level, finds a slot (a free one, else the lowest-level evictable
    one) and copies the expert from host memory with the cache's donating slot write.
  * Eviction: every slot has a level. A request of level r may evict only a slot whose
    level is below r. While a layer computes, its resident experts are frozen at level K + 1
    and never evicted. When it finishes they drop to level 0, so they are the first
    candidates for eviction until the next utility update raises them again.
  * Staleness: when a layer starts computing, its pending requests are dropped (too late).

Invariants (checked by the stress test): the cache never contains more experts than slots, a
frozen expert is never evicted, and a slot's weights are always those of its recorded owner.
"""

import collections
import dataclasses
import threading
import time

import numpy as np
from absl import logging

from spac_jax.offload.cache import ExpertCache


@dataclasses.dataclass(frozen=True)
class PrefetchRequest:
  layer: int
  expert: int
  level: int  # Utility level in 1..K; higher is served first and may evict more.


@dataclasses.dataclass
class EngineStats:
  """Counters of the prefetch worker."""

  prefetches: int = 0  # Experts copied in by the worker.
  wasted_prefetches: int = 0  # Prefetched, then evicted before any layer used them.
  dropped_stale: int = 0  # Requests dropped because their layer had started.
  dropped_no_slot: int = 0  # Requests dropped because no slot had a lower level.
  transfer_stall_s: float = 0.0  # Time layers waited for an in-flight copy.
  host_to_device_bytes: np.ndarray | None = None  # [L] bytes copied by the worker.


class PrefetchEngine:
  """Prefetch queue and worker thread over an ExpertCache.

  All shared state is guarded by the cache's lock (through `self.condition`). The worker
  dispatches each copy under the lock, which is cheap because JAX dispatch is asynchronous.
  The copy completes in the background. A layer that needs a copied expert waits for it in
  `start_layer`, and that wait is counted as transfer stall. A read of the cache dispatched before a copy
  donates the cache arrays still reads the old buffer, because the runtime orders the two.
  """

  def __init__(self, cache: ExpertCache, num_levels: int, num_layers: int,
               wait_timeout_s: float = 10.0, bytes_counter: np.ndarray | None = None):
    """Start the worker.

    Args:
      cache: the device expert cache to fill.
      num_levels: K, the highest utility level.
      num_layers: MoE layers, for the per-layer byte counter.
      wait_timeout_s: bound on every wait, so a stuck worker raises instead of hanging.
      bytes_counter: [L] array to add copied bytes to (default: a new one in `stats`).
    """
    self.cache = cache
    self.num_levels = num_levels  # K: utility levels are 0..K, K + 1 means frozen.
    self.frozen_level = num_levels + 1
    self.wait_timeout_s = wait_timeout_s
    self.condition = threading.Condition(cache.lock)
    self.queues = [collections.deque() for _ in range(num_levels + 1)]
    self.slot_level = np.zeros(cache.num_slots, np.int64)
    self.unused_prefetch: set[tuple[int, int]] = set()
    self.unconfirmed: set[tuple[int, int]] = set()  # Copies dispatched, maybe not finished.
    if bytes_counter is None:
      bytes_counter = np.zeros(num_layers, np.int64)
    self.stats = EngineStats(host_to_device_bytes=bytes_counter)
    self._closed = False
    self._busy = False  # The worker has a request it has not finished.
    self.error: Exception | None = None  # Set when the worker died.
    self._worker = threading.Thread(target=self._run, name='spac-prefetch', daemon=True)
    self._worker.start()

  # Decoding-thread API.

  def _check_worker(self) -> None:
    if self.error is not None:
      raise RuntimeError(f'The prefetch worker failed: {self.error!r}') from self.error

  def submit(self, requests: list[PrefetchRequest]) -> None:
    """Queue requests; a request for a resident or already queued expert is ignored."""
    with self.condition:
      self._check_worker()
      queued = {(r.layer, r.expert) for queue in self.queues for r in queue}
      for request in requests:
        key = (request.layer, request.expert)
        if not 1 <= request.level <= self.num_levels:
          raise ValueError(f'Prefetch level {request.level} outside [1, {self.num_levels}].')
        if key in queued or self.cache.is_resident(*key):
          continue
        self.queues[request.level].append(request)
        queued.add(key)
      self.condition.notify_all()

  def set_levels(self, levels: np.ndarray) -> None:
    """Give every unfrozen slot the utility level [L, E] of the expert it holds."""
    with self.condition:
      for slot, owner in enumerate(self.cache.owner):
        if owner is not None and self.slot_level[slot] != self.frozen_level:
          self.slot_level[slot] = levels[owner]

  def start_layer(self, layer: int, needed: np.ndarray) -> None:
    """Drop the layer's pending requests, wait for copies it needs, freeze its experts."""
    with self.condition:
      self._check_worker()
      for queue in self.queues:
        kept = [r for r in queue if r.layer != layer]
        self.stats.dropped_stale += len(queue) - len(kept)
        queue.clear()
        queue.extend(kept)
      if any((layer, int(expert)) in self.unconfirmed for expert in needed):
        started = time.perf_counter()
        for array in (self.cache.gate, self.cache.up, self.cache.down):
          array.block_until_ready()  # The newest arrays include every dispatched copy.
        self.unconfirmed.clear()
        self.stats.transfer_stall_s += time.perf_counter() - started
      for expert in needed:
        key = (layer, int(expert))
        slot = self.cache.slot_of.get(key)
        if slot is not None:
          self.slot_level[slot] = self.frozen_level
          self.unused_prefetch.discard(key)

  def finish_layer(self, layer: int) -> None:
    """Unfreeze the layer's experts; they drop to level 0."""
    with self.condition:
      for slot, owner in enumerate(self.cache.owner):
        if owner is not None and owner[0] == layer and self.slot_level[slot] == self.frozen_level:
          self.slot_level[slot] = 0
      self.condition.notify_all()

  def wait_idle(self, timeout_s: float | None = None) -> bool:
    """Block until the queues are empty and no copy is in flight; False on timeout."""
    with self.condition:
      return self.condition.wait_for(
          lambda: self._closed or (not self._busy and not any(self.queues)),
          timeout_s if timeout_s is not None else self.wait_timeout_s)

  def close(self) -> None:
    """Stop the worker, dropping pending requests; returns once the worker has exited."""
    with self.condition:
      self._closed = True
      for queue in self.queues:
        queue.clear()
      self.condition.notify_all()
    self._worker.join(timeout=self.wait_timeout_s)
    if self._worker.is_alive():
      raise TimeoutError(f'Prefetch worker did not stop within {self.wait_timeout_s} s.')

  # Worker thread.

  def _next_request(self) -> PrefetchRequest | None:
    for level in range(self.num_levels, 0, -1):
      if self.queues[level]:
        return self.queues[level].popleft()
    return None

  def _victim_slot(self, level: int) -> int | None:
    """Return a free slot, else the unfrozen slot of lowest level below `level`, else None."""
    free = np.flatnonzero([owner is None for owner in self.cache.owner])
    if free.size:
      return int(free[0])
    if self.cache.num_slots == 0:
      return None
    slot = int(np.argmin(self.slot_level))
    return slot if self.slot_level[slot] < level else None

  def _run(self) -> None:
    while True:
      with self.condition:
        self.condition.wait_for(lambda: self._closed or any(self.queues))
        if self._closed:
          return
        self._busy = True
        try:
          self._serve(self._next_request())
        except Exception as error:  # pylint: disable=broad-except
          # The decoding thread re-raises it at its next call; decoding must not go on
          # with a worker that silently died.
          logging.exception('Prefetch worker stopped.')
          self.error = error
          self._closed = True
          return
        finally:
          self._busy = False
          self.condition.notify_all()

  def _serve(self, request: PrefetchRequest | None) -> None:
    """Copy one requested expert into a slot, if it is not resident and a slot allows."""
    if request is None or self.cache.is_resident(request.layer, request.expert):
      return
    slot = self._victim_slot(request.level)
    if slot is None:
      self.stats.dropped_no_slot += 1
      return
    evicted = self.cache.owner[slot]
    if evicted in self.unused_prefetch:
      self.unused_prefetch.discard(evicted)
      self.stats.wasted_prefetches += 1
    key = (request.layer, request.expert)
    copied = self.cache.write(slot, *key)
    self.slot_level[slot] = request.level
    self.unused_prefetch.add(key)
    self.unconfirmed.add(key)
    self.stats.prefetches += 1
    self.stats.host_to_device_bytes[request.layer] += copied
