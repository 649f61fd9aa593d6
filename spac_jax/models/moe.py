"""Mixture-of-Experts feed-forward block: softmax router, top-k, SwiGLU experts.

The router of Qwen3-MoE takes the softmax over all experts, keeps the top-k and (with
`norm_topk_prob`) renormalises the kept weights to sum to one, then multiplies them by
`routed_scale` (1 except in DeepSeek-style configs). Mixtral always renormalises, OLMoE and
Qwen2-MoE by default do not. Every expert is a SwiGLU MLP with its own gate, up and down
projections, stored stacked over experts.

An optional shared expert (Qwen2-MoE, DeepSeek) is a dense SwiGLU MLP that every token
passes through. Its output is added to the routed output, scaled first by sigmoid(x @ w_gate)
when `shared_expert_gate` is set. It belongs to the block, never to the routed expert stacks,
so the offload engine keeps it on the device.

Two forward paths share the router:
  * `MoEBlock.__call__` for training: capacity-based dispatch (tokens sorted into per-expert
    buffers of fixed capacity, one batched matmul per projection). Pairs past capacity are
    dropped, as in Switch-style training.
  * `MoEBlock.dense_reference`: every expert on every token, combined with the sparse
    routing weights. No drops; the exact function inference must reproduce.
Inference does not call either: the offload engine reads `router` and the expert stacks
and splits the work between the device cache and the CPU.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spac_jax.models.config import ModelConfig
from spac_jax.models.layers import DenseMLP, swiglu


class Routing(NamedTuple):
  """Top-k routing decision for N tokens."""

  weights: jax.Array  # [N, k] routing weights of the chosen experts.
  expert_ids: jax.Array  # [N, k] int32 chosen experts.
  probs: jax.Array  # [N, E] softmax over all experts (for the load-balancing loss).


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool, scale: float = 1.0,
          groups: int = 1, topk_groups: int = 1) -> Routing:
  """Choose the top-k experts per token from router logits [N, E].

  Steps:
    1. Softmax over all experts, in float32.
    2. With groups > 1 (DeepSeek-V2's group-limited greedy): split the experts into `groups`
       equal groups, keep the `topk_groups` groups whose best expert scores highest, and
       zero the scores of every other group.
    3. Keep the k largest scores as weights.
    4. Renormalise the weights to sum to one when `norm_topk_prob`, then multiply by `scale`.
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  scores = probs
  if groups > 1:
    grouped = probs.reshape(probs.shape[0], groups, -1)  # [N, G, E / G]
    _, kept_groups = jax.lax.top_k(grouped.max(axis=-1), topk_groups)  # [N, topk_groups]
    group_mask = jax.nn.one_hot(kept_groups, groups).sum(axis=1) > 0  # [N, G]
    scores = jnp.where(group_mask[:, :, None], grouped, 0.0).reshape(probs.shape)
  weights, expert_ids = jax.lax.top_k(scores, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  if scale != 1.0:
    weights = weights * scale
  return Routing(weights, expert_ids.astype(jnp.int32), probs)


def combine_matrix(routing: Routing, num_experts: int) -> jax.Array:
  """Scatter the top-k weights into a dense [N, E] matrix (zero for unchosen experts)."""
  one_hot = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=routing.weights.dtype)
  return jnp.einsum('nk,nke->ne', routing.weights, one_hot)


def load_balancing_loss(routing: Routing, num_experts: int) -> jax.Array:
  """Switch-style auxiliary loss: E * sum_e (fraction of picks to e) * (mean prob of e).

  Equals 1 for perfectly uniform routing; larger values mean more imbalance.
  """
  picks = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32).sum(axis=1)
  fraction = picks.mean(axis=0) / routing.expert_ids.shape[-1]
  return num_experts * jnp.sum(fraction * routing.probs.mean(axis=0))


class SharedExpert(nnx.Module):
  """The always-on shared expert of a layer, optionally behind a sigmoid gate."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.mlp = DenseMLP(cfg.d_model, cfg.shared_expert_dim, rngs)
    self.gate = (nnx.Linear(cfg.d_model, 1, use_bias=False, rngs=rngs)
                 if cfg.shared_expert_gate else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Shared expert output [N, D] for x [N, D]."""
    y = self.mlp(x)
    if self.gate is not None:
      y = jax.nn.sigmoid(self.gate(x)) * y
    return y


class MoEBlock(nnx.Module):
  """Routed SwiGLU experts behind a softmax top-k router, plus an optional shared expert."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.num_experts = cfg.num_experts
    self.top_k = cfg.top_k
    self.norm_topk_prob = cfg.norm_topk_prob
    self.routed_scale = cfg.routed_scale
    self.router_groups = (cfg.router_groups, cfg.router_topk_groups)
    self.router = nnx.Linear(cfg.d_model, cfg.num_experts, use_bias=False, rngs=rngs)
    self.shared = SharedExpert(cfg, rngs) if cfg.shared_expert_dim else None
    init_in = nnx.initializers.normal(cfg.d_model**-0.5)
    init_out = nnx.initializers.normal(cfg.expert_dim**-0.5)
    experts = (cfg.num_experts,)
    self.gate = nnx.Param(init_in(rngs.params(), experts + (cfg.d_model, cfg.expert_dim)))
    self.up = nnx.Param(init_in(rngs.params(), experts + (cfg.d_model, cfg.expert_dim)))
    self.down = nnx.Param(init_out(rngs.params(), experts + (cfg.expert_dim, cfg.d_model)))

  def route(self, x: jax.Array) -> Routing:
    """Route tokens x [N, D]."""
    return route(self.router(x), self.top_k, self.norm_topk_prob, self.routed_scale,
                 *self.router_groups)

  def shared_output(self, x: jax.Array) -> jax.Array:
    """Shared expert output [N, D], zeros when the block has no shared expert."""
    return jnp.zeros_like(x) if self.shared is None else self.shared(x)

  def dense_reference(self, x: jax.Array) -> jax.Array:
    """Compute every expert on every token and combine with the routing weights. x: [N, D]."""
    combine = combine_matrix(self.route(x), self.num_experts)  # [N, E]
    per_expert = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(x, self.gate[...], self.up[...],
                                                          self.down[...])  # [E, N, D]
    routed = jnp.einsum('ne,end->nd', combine.astype(x.dtype), per_expert)
    return routed + self.shared_output(x)

  def __call__(self, x: jax.Array, capacity_factor: float = 2.0
               ) -> tuple[jax.Array, jax.Array]:
    """Training forward with capacity-based dispatch.

    Steps:
      1. Route the N tokens; flatten the N * k (token, expert) pairs.
      2. Give each pair its arrival position within its expert; pairs at or past the
         capacity C = ceil(capacity_factor * N * k / E) are dropped.
      3. Scatter pair inputs into an [E, C, D] buffer, run the experts as batched matmuls,
         gather the outputs back and sum them with the routing weights.

    Args:
      x: [N, D] normalised hidden states.
      capacity_factor: buffer slack over a uniform load.

    Returns:
      [N, D] output and the load-balancing loss.
    """
    num_tokens, d_model = x.shape
    routing = self.route(x)

    capacity = max(1, -(-int(capacity_factor * num_tokens * self.top_k) // self.num_experts))
    flat_ids = routing.expert_ids.reshape(-1)  # [N*k]
    one_hot = jax.nn.one_hot(flat_ids, self.num_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # [N*k]
    kept = position < capacity

    pair_inputs = jnp.repeat(x, self.top_k, axis=0)  # [N*k, D]
    buffer = jnp.zeros((self.num_experts, capacity, d_model), x.dtype)
    buffer = buffer.at[flat_ids, position].set(pair_inputs, mode='drop')
    outputs = jax.vmap(swiglu)(buffer, self.gate[...], self.up[...], self.down[...])
    pair_outputs = outputs[flat_ids, jnp.minimum(position, capacity - 1)]  # [N*k, D]
    pair_weights = (routing.weights.reshape(-1) * kept).astype(x.dtype)
    y = (pair_outputs * pair_weights[:, None]).reshape(num_tokens, self.top_k, d_model).sum(1)
    return y + self.shared_output(x), load_balancing_loss(routing, self.num_experts)
