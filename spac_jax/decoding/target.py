"""The MoE target run layer by layer, with routed experts offloaded to host memory.

One forward pass over a window of W tokens:
  1. Embed the tokens (device).
  2. For each layer: attention and routing in one jitted call (device), then the routing
     comes to Python, the policy acts (`before_layer`), the needed experts are split into
     cached ones (computed from device slots) and the rest (computed on the CPU from
     pinned_host weights); both kernels are dispatched before either is awaited, so they
     run concurrently, and a jitted join adds both partial outputs to the residual stream.
     Then `after_layer`.
  3. Final norm and LM head (device); greedy token per position.
Every jitted piece has static shapes given (W, expert bucket), so decoding compiles a bounded
set of programs and never one per token.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spac_jax.models.config import ModelConfig
from spac_jax.models.layers import KVCache
from spac_jax.models.moe import route
from spac_jax.models.transformer import Transformer, lm_logits
from spac_jax.offload import experts, memory
from spac_jax.offload.cache import ExpertCache, ExpertStacks, HostExpertStore
from spac_jax.offload.stats import OffloadStats
from spac_jax.policies import POLICIES, PolicyOptions, make_policy

EXPERT_NAMES = ('gate', 'up', 'down')


def expert_sharding_fn(path: tuple, leaf) -> jax.sharding.Sharding:
  """Checkpoint placement: routed expert stacks to pinned_host, everything else to device."""
  del leaf
  is_expert = len(path) >= 2 and path[-2] == 'ffn' and path[-1] in EXPERT_NAMES
  return memory.sharding(memory.PINNED_HOST if is_expert else memory.DEVICE)


@partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(3,))
def _attention_and_route(graphdef, state, h, cache: KVCache, start, top_k: int,
                         norm_topk_prob: bool):
  """Attention block and router of one layer. h: [1, W, D]."""
  input_norm, attn, post_attention_norm, router = nnx.merge(graphdef, state)
  positions = start + jnp.arange(h.shape[1])
  attn_out, cache = attn(input_norm(h), positions, cache, start)
  h = h + attn_out
  x = post_attention_norm(h)[0]  # [W, D]
  routing = route(router(x), top_k, norm_topk_prob)
  return h, x, routing.weights, routing.expert_ids, cache


@partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
  embed, = nnx.merge(graphdef, state)
  return embed(tokens)


@partial(jax.jit, static_argnums=(0, 1))
def _greedy(cfg: ModelConfig, graphdef, state, h):
  """Greedy next token at every position of h [1, W, D] -> [W] int32."""
  embed, final_norm, lm_head = nnx.merge(graphdef, state)
  return jnp.argmax(lm_logits(cfg, embed, final_norm, lm_head, h)[0], axis=-1).astype(jnp.int32)


def _split_to_device(modules):
  graphdef, state = nnx.split(modules)
  return graphdef, memory.to_device(state)


class OffloadedTarget:
  """Greedy forward passes of an MoE Transformer whose experts live in host memory.

  Attributes:
    cfg: the model shape.
    cache: the device expert cache.
    policy: the cache policy.
    stats: per-layer hit, miss, byte and CPU counters.
    counts: [L, E] activation counts of the most recent forward pass.
  """

  def __init__(self, model: Transformer, policy_name: str, requested_slots: int,
               policy_options: PolicyOptions | None = None):
    cfg = model.cfg
    if not cfg.is_moe:
      raise ValueError('OffloadedTarget needs an MoE model (num_experts > 0).')
    self.cfg = cfg
    stacks = []
    self._layers = []
    for layer in model.layers:
      stacks.append(ExpertStacks(*(memory.to_host(getattr(layer.ffn, name)[...])
                                   for name in EXPERT_NAMES)))
      self._layers.append(_split_to_device(
          (layer.input_norm, layer.attn, layer.post_attention_norm, layer.ffn.router)))
    self._embed = _split_to_device((model.embed,))
    self._head = _split_to_device((model.embed, model.final_norm, model.lm_head))

    self.store = HostExpertStore(stacks)
    if policy_name not in POLICIES:
      raise ValueError(f'Unknown offload policy {policy_name!r}; choose one of '
                       f'{sorted(POLICIES)}.')
    num_slots = POLICIES[policy_name].num_slots(requested_slots, self.store.total_experts)
    self.cache = ExpertCache(self.store, num_slots)
    self.stats = OffloadStats.zeros(cfg.num_layers)
    self.policy = make_policy(policy_name, self.cache, self.stats, policy_options)
    self.counts = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)
    self.caches = self.init_caches()

  def init_caches(self) -> list[KVCache]:
    return [memory.to_device(KVCache.zeros(self.cfg, 1)) for _ in range(self.cfg.num_layers)]

  def forward(self, tokens: np.ndarray, start: int, num_valid: int) -> np.ndarray:
    """Run one forward pass and return the greedy next token at each valid position.

    Args:
      tokens: [W] token ids; positions >= num_valid are padding.
      start: cache position of tokens[0].
      num_valid: real tokens in the window; only they count as expert demand.

    Returns:
      [num_valid] int greedy predictions.
    """
    window = len(tokens)
    h = _embed(*self._embed, jnp.asarray(tokens, jnp.int32)[None])
    start = jnp.int32(start)
    for index, (graphdef, state) in enumerate(self._layers):
      h, x, weights, expert_ids, self.caches[index] = _attention_and_route(
          graphdef, state, h, self.caches[index], start, self.cfg.top_k,
          self.cfg.norm_topk_prob)
      ids = np.asarray(expert_ids)[:num_valid]
      self.counts[index] = np.bincount(ids.reshape(-1), minlength=self.cfg.num_experts)
      h = self._moe(index, h, x, weights, expert_ids, np.flatnonzero(self.counts[index]),
                    window)
    self.policy.after_pass(self.counts.copy(), num_valid)
    predictions = _greedy(self.cfg, *self._head, h)
    return np.asarray(predictions)[:num_valid]

  def _moe(self, layer: int, h, x, weights, expert_ids, needed: np.ndarray, window: int):
    """Split the layer's needed experts between cache slots and the CPU, and join."""
    fetched = self.policy.before_layer(layer, needed)
    with self.cache.lock:
      slots = [self.cache.slot_of.get((layer, int(e)), -1) for e in needed]
      # A hit is an expert already resident; one the policy fetched just now is a miss.
      misses = sum(s < 0 for s in slots) + len(fetched)
      self.stats.misses[layer] += misses
      self.stats.hits[layer] += len(needed) - misses
      on_device = [(int(e), s) for e, s in zip(needed, slots) if s >= 0]
      on_host = [int(e) for e, s in zip(needed, slots) if s < 0]
      cap = min(window * self.cfg.top_k, self.cfg.num_experts)
      zeros = jnp.zeros_like(x)
      device_part = host_part = zeros
      if on_device:
        size = experts.bucket(len(on_device), cap)
        chosen = np.full(size, -1, np.int32)
        chosen_slots = np.zeros(size, np.int32)
        chosen[:len(on_device)], chosen_slots[:len(on_device)] = zip(*on_device)
        device_part = experts.device_experts(self.cache.gate, self.cache.up, self.cache.down,
                                             x, weights, expert_ids, jnp.asarray(chosen),
                                             jnp.asarray(chosen_slots))
      if on_host:
        size = experts.bucket(len(on_host), cap)
        chosen = np.full(size, -1, np.int32)
        chosen[:len(on_host)] = on_host
        host_part = experts.host_experts(*self.store.layers[layer].as_tuple(), x, weights,
                                         expert_ids, jnp.asarray(chosen))
      h = experts.join(h, device_part, host_part)
    self.stats.device_experts[layer] += len(on_device)
    self.stats.cpu_experts[layer] += len(on_host)

    self.policy.after_layer(layer, needed)
    return h
