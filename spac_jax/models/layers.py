"""Transformer building blocks: rotary embeddings, grouped-query attention, SwiGLU MLP.

Shapes use B = batch, T = query tokens, S = key positions, H = query heads,
K = key/value heads, G = H // K query heads per key/value head, Dh = head dim.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spac_jax.models import rope
from spac_jax.models.config import ModelConfig


class KVCache(NamedTuple):
  """Preallocated keys and values of one attention layer."""

  k: jax.Array  # [B, S_max, K, Dh]
  v: jax.Array  # [B, S_max, K, Dh]

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, dtype=jnp.float32) -> 'KVCache':
    shape = (batch, cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               rope_scaling: tuple[tuple[str, object], ...] = ()) -> jax.Array:
  """Rotate the two halves of each head by position (the `rotate_half` convention).

  Args:
    x: [B, T, H, Dh] queries or keys.
    positions: [T] absolute token positions.
    theta: rotary base.
    rope_scaling: `ModelConfig.rope_scaling`; its attention factor scales cos and sin.
  """
  half = x.shape[-1] // 2
  inv_freq, factor = rope.frequencies(x.shape[-1], theta, rope_scaling)
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)  # [T, Dh/2]
  sin = factor * jnp.sin(angles)[None, :, None, :]
  cos = factor * jnp.cos(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def linear(d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
  """Build a dense projection, without a bias unless asked."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, rngs=rngs)


class Attention(nnx.Module):
  """Grouped-query attention with optional RMSNorm on queries and keys.

  `cfg.qk_norm` selects the norm: per head (Qwen3), over the whole projection before the
  split into heads (OLMoE), or none (Llama, Mixtral, Qwen2-MoE).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = cfg.head_dim
    self.rope_theta = cfg.rope_theta
    self.rope_scaling = cfg.rope_scaling
    self.qk_norm = cfg.qk_norm
    self.clip_qkv = cfg.clip_qkv
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.q_proj = linear(cfg.d_model, q_size, rngs, cfg.qkv_bias)
    self.k_proj = linear(cfg.d_model, kv_size, rngs, cfg.qkv_bias)
    self.v_proj = linear(cfg.d_model, kv_size, rngs, cfg.qkv_bias)
    self.o_proj = linear(q_size, cfg.d_model, rngs, cfg.o_bias)
    if cfg.qk_norm == 'none':
      self.q_norm = self.k_norm = None
    else:
      q_norm_size, k_norm_size = ((cfg.head_dim, cfg.head_dim) if cfg.qk_norm == 'head'
                                  else (q_size, kv_size))
      self.q_norm = nnx.RMSNorm(q_norm_size, epsilon=cfg.norm_eps, rngs=rngs)
      self.k_norm = nnx.RMSNorm(k_norm_size, epsilon=cfg.norm_eps, rngs=rngs)

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Compute q [B, T, H, Dh], k and v [B, T, K, Dh] before rotary embeddings.

    Order, as in the Hugging Face implementations: projection, q/k norm (per head or over
    the whole projection), clamp to +-clip_qkv.
    """
    batch, length, _ = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.qk_norm == 'full':
      q, k = self.q_norm(q), self.k_norm(k)
    q = q.reshape(batch, length, self.num_heads, self.head_dim)
    k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.qk_norm == 'head':
      q, k = self.q_norm(q), self.k_norm(k)
    if self.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
    return q, k, v

  def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
               start: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
    """Attend causally.

    Without a cache the T tokens attend to each other (training). With a cache their keys
    and values are written at `start`, and they attend to every cached position up to their
    own. Positions past them contain stale values from rolled-back windows and are masked.

    Args:
      x: [B, T, D] normalised hidden states.
      positions: [T] absolute positions, `start + arange(T)` when a cache is given.
      cache: this layer's KV cache, or None.
      start: first cache position written.

    Returns:
      [B, T, D] attention output and the updated cache (None without a cache).
    """
    batch, length, _ = x.shape
    q, k, v = self.project(x)
    q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
    k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)

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
  """Dense SwiGLU MLP of hidden size `hidden_dim` (dense layers and shared experts)."""

  def __init__(self, d_model: int, hidden_dim: int, rngs: nnx.Rngs):
    self.gate_proj = linear(d_model, hidden_dim, rngs)
    self.up_proj = linear(d_model, hidden_dim, rngs)
    self.down_proj = linear(hidden_dim, d_model, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
