"""Transformer building blocks: rotary embeddings, grouped-query attention, SwiGLU MLP.

Shapes use B = batch, T = query tokens, S = key positions, H = query heads,
K = key/value heads, G = H // K query heads per key/value head, Dh = head dim.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spac_jax.models.config import ModelConfig


class KVCache(NamedTuple):
  """Preallocated keys and values of one attention layer."""

  k: jax.Array  # [B, S_max, K, Dh]
  v: jax.Array  # [B, S_max, K, Dh]

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, dtype=jnp.float32) -> 'KVCache':
    shape = (batch, cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate the two halves of each head by position (the `rotate_half` convention).

  Args:
    x: [B, T, H, Dh] queries or keys.
    positions: [T] absolute token positions.
    theta: rotary base.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, Dh/2]
  sin = jnp.sin(angles)[None, :, None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)


class Attention(nnx.Module):
  """Grouped-query attention with per-head RMSNorm on queries and keys (Qwen3 style)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = cfg.head_dim
    self.rope_theta = cfg.rope_theta
    self.q_proj = _linear(cfg.d_model, cfg.num_heads * cfg.head_dim, rngs)
    self.k_proj = _linear(cfg.d_model, cfg.num_kv_heads * cfg.head_dim, rngs)
    self.v_proj = _linear(cfg.d_model, cfg.num_kv_heads * cfg.head_dim, rngs)
    self.o_proj = _linear(cfg.num_heads * cfg.head_dim, cfg.d_model, rngs)
    self.q_norm = nnx.RMSNorm(cfg.head_dim, epsilon=cfg.norm_eps, rngs=rngs)
    self.k_norm = nnx.RMSNorm(cfg.head_dim, epsilon=cfg.norm_eps, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
               start: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
    """Attend causally.

    Without a cache the T tokens attend to each other (training). With a cache their keys
    and values are written at `start` and they attend to every cached position up to their
    own; positions past them hold stale values from rolled-back windows and are masked.

    Args:
      x: [B, T, D] normalised hidden states.
      positions: [T] absolute positions, `start + arange(T)` when a cache is given.
      cache: this layer's KV cache, or None.
      start: first cache position written.

    Returns:
      [B, T, D] attention output and the updated cache (None without a cache).
    """
    batch, length, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim))
    k = self.k_norm(self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim))
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)

    if cache is None:
      keys, values, key_positions = k, v, positions
    else:
      index = (0, start, 0, 0)
      cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), index),
                      jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), index))
      keys, values = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
      key_positions = jnp.arange(keys.shape[1])

    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, keys).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(self.head_dim))
    causal = key_positions[None, :] <= positions[:, None]  # [T, S]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', probs, values)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)
    return self.o_proj(out), cache


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)). x: [..., D]."""
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


class DenseMLP(nnx.Module):
  """Dense SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg.d_model, cfg.mlp_dim, rngs)
    self.up_proj = _linear(cfg.d_model, cfg.mlp_dim, rngs)
    self.down_proj = _linear(cfg.mlp_dim, cfg.d_model, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
