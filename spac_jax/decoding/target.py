"""The MoE target run layer by layer, with routed experts offloaded to host memory.

One forward pass over a window of W tokens:
  1. Embed the tokens (device).
  2. For each MoE layer: attention, the shared expert (if any) and routing run in one jitted
     call (device). The routing comes to Python and the policy acts (`before_layer`). The
     needed experts are split into cached ones (computed from device slots) and the rest
     (computed on the CPU from pinned_host weights). Both kernels are dispatched before
     either is awaited, so the runtime may overlap them, and a jitted join adds both
     partial outputs to the residual stream. Then `after_layer`.
     NOTE: the CPU backend showed no overlap. Kernels of 122.8 and 114.6 ms took 232.5 ms
     dispatched together, both using the 2 cores. Overlap on a GPU is unverified.
     A layer without routed experts (dense-first layers, `mlp_only_layers`) runs attention and
     its dense MLP in one jitted call on the device. The cache and the policy never see it.
  3. Final norm and LM head (device); greedy token per position.
The host store, the cache, the policies and the stats index MoE layers 0..M-1 in model order
(`ModelConfig.moe_layers` maps them to model layers).
Every jitted piece has static shapes given (W, expert bucket), so decoding compiles a bounded
set of programs and never one per token.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spac_jax.models.config import ModelConfig
from spac_jax.models.moe import route
from spac_jax.models.transformer import AttentionCache, Transformer, init_cache, lm_logits
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


@partial(jax.jit, static_argnums=(0, 5), donate_argnums=(3,))
def _attention_and_route(graphdef, state, h, cache: AttentionCache, start,
                         router_options: tuple):
  """Attention block, shared expert and router of one MoE layer. h: [1, W, D].

  Args:
    router_options: the static arguments of `moe.route` after the logits.

  Returns:
    h plus attention and shared expert outputs, the normalised x [W, D] the routed experts
    read, routing weights and expert ids [W, k], and the updated attention cache.
  """
  input_norm, attn, post_attention_norm, router, shared = nnx.merge(graphdef, state)
  positions = start + jnp.arange(h.shape[1])
  attn_out, cache = attn(input_norm(h), positions, cache, start)
  h = h + attn_out
  x = post_attention_norm(h)[0]  # [W, D]
  routing = route(router(x), *router_options)
  if shared is not None:
    h = h + shared(x)[None]
  return h, x, routing.weights, routing.expert_ids, cache


@partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _dense_layer(graphdef, state, h, cache: AttentionCache, start):
  """Run a whole layer without routed experts (attention and dense MLP). h: [1, W, D]."""
  input_norm, attn, post_attention_norm, mlp = nnx.merge(graphdef, state)
  positions = start + jnp.arange(h.shape[1])
  attn_out, cache = attn(input_norm(h), positions, cache, start)
  h = h + attn_out
  return h + mlp(post_attention_norm(h)), cache


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


def _to_host(array: jax.Array) -> jax.Array:
  """Place an expert stack in pinned_host memory, without a copy when it is already there."""
  if memory.memory_kind(array) == memory.PINNED_HOST:
    return array
  return memory.to_host(array)


class OffloadedTarget:
  """Greedy forward passes of an MoE Transformer whose experts live in host memory.

  Attributes:
    cfg: the model shape.
    cache: the device expert cache.
    policy: the cache policy.
    stats: per-MoE-layer hit, miss, byte and CPU counters.
    counts: [M, E] activation counts of the most recent forward pass, M = MoE layers.
  """

  def __init__(self, model: Transformer, policy_name: str, requested_slots: int,
               policy_options: PolicyOptions | None = None):
    cfg = model.cfg
    if not cfg.is_moe:
      raise ValueError('OffloadedTarget needs an MoE model (num_experts > 0).')
    self.cfg = cfg
    self._router_options = (cfg.top_k, cfg.norm_topk_prob, cfg.routed_scale, cfg.router_groups,
                            cfg.router_topk_groups)
    stacks = []
    # Per model layer: (MoE layer index or None for a dense layer, graphdef, device state).
    self._layers: list[tuple[int | None, nnx.GraphDef, nnx.State]] = []
    for layer in model.layers:
      if layer.is_moe:
        stacks.append(ExpertStacks(*(_to_host(getattr(layer.ffn, name)[...])
                                     for name in EXPERT_NAMES)))
        modules = (layer.input_norm, layer.attn, layer.post_attention_norm, layer.ffn.router,
                   layer.ffn.shared)
        self._layers.append((len(stacks) - 1, *_split_to_device(modules)))
      else:
        modules = (layer.input_norm, layer.attn, layer.post_attention_norm, layer.ffn)
        self._layers.append((None, *_split_to_device(modules)))
    self._embed = _split_to_device((model.embed,))
    self._head = _split_to_device((model.embed, model.final_norm, model.lm_head))

    self.store = HostExpertStore(stacks)
    if policy_name not in POLICIES:
      raise ValueError(f'Unknown offload policy {policy_name!r}; choose one of '
                       f'{sorted(POLICIES)}.')
    num_slots = POLICIES[policy_name].num_slots(requested_slots, self.store.total_experts)
    self.cache = ExpertCache(self.store, num_slots)
    self.stats = OffloadStats.zeros(self.store.num_layers)
    self.policy = make_policy(policy_name, self.cache, self.stats, policy_options)
    self.counts = np.zeros((self.store.num_layers, cfg.num_experts), np.int64)
    self.dtype = model.dtype
    self.caches = self.init_caches()

  def init_caches(self) -> list[AttentionCache]:
    return [memory.to_device(init_cache(self.cfg, 1, self.dtype))
            for _ in range(self.cfg.num_layers)]

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
    for index, (moe_index, graphdef, state) in enumerate(self._layers):
      if moe_index is None:
        h, self.caches[index] = _dense_layer(graphdef, state, h, self.caches[index], start)
        continue
      h, x, weights, expert_ids, self.caches[index] = _attention_and_route(
          graphdef, state, h, self.caches[index], start, self._router_options)
      ids = np.asarray(expert_ids)[:num_valid]
      self.counts[moe_index] = np.bincount(ids.reshape(-1), minlength=self.cfg.num_experts)
      h = self._moe(moe_index, h, x, weights, expert_ids,
                    np.flatnonzero(self.counts[moe_index]), window)
    self.policy.after_pass(self.counts.copy(), num_valid)
    predictions = _greedy(self.cfg, *self._head, h)
    return np.asarray(predictions)[:num_valid]

  def _moe(self, layer: int, h, x, weights, expert_ids, needed: np.ndarray, window: int):
    """Split MoE layer `layer`'s needed experts between cache slots and the CPU, and join."""
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
