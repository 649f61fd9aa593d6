"""Multi-head latent attention (MLA) of DeepSeek-V2, as transformers' deepseek_v2 computes it.

Shapes use B = batch, T = query tokens, S = cached positions, H = heads, R = kv_lora_rank,
Dn = qk_nope_head_dim, Dr = qk_rope_head_dim (= cfg.head_dim), Dv = v_head_dim.

Steps of one call:
  1. Queries: q_proj, or the low-rank path q_a_proj -> RMSNorm -> q_b_proj; split per head
     into a part without position (Dn) and a rotary part (Dr).
  2. Keys and values: kv_a_proj_with_mqa gives the latent [R] (RMSNorm'd) and one rotary key
     [Dr] shared by all heads. Only these two are cached, which is MLA's memory saving.
  3. Rotary embedding on the rotary parts, in the interleaved convention (pairs of adjacent
     dims rotate together), unlike the rotate_half convention of `layers.apply_rope`.
  4. kv_b_proj expands every cached latent into per-head keys [Dn] and values [Dv]; the key of
     a head is [k_nope, shared rotary key].
  5. Causal softmax attention with scale (Dn + Dr)^-0.5 (times YaRN's mscale^2 when the
     checkpoint uses YaRN), then o_proj.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spac_jax.models import rope
from spac_jax.models.config import ModelConfig
from spac_jax.models.layers import linear

# transformers' DeepseekV2Attention builds q_a_layernorm and kv_a_layernorm without passing
# rms_norm_eps (transformers 5.25.0), so they use its RMSNorm default of 1e-6.
LATENT_NORM_EPS = 1e-6


class LatentCache(NamedTuple):
  """Preallocated latents and shared rotary keys of one MLA layer."""

  latent: jax.Array  # [B, S_max, R], after kv_a_layernorm.
  k_rope: jax.Array  # [B, S_max, Dr], after the rotary embedding.

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, dtype=jnp.float32) -> 'LatentCache':
    return cls(jnp.zeros((batch, cfg.max_seq_len, cfg.kv_lora_rank), dtype),
               jnp.zeros((batch, cfg.max_seq_len, cfg.head_dim), dtype))


def apply_rope_interleaved(x: jax.Array, positions: jax.Array, theta: float,
                           rope_scaling: tuple[tuple[str, object], ...] = ()) -> jax.Array:
  """Rotate pairs (x[2i], x[2i+1]) by position * inv_freq[i]. x: [B, T, ..., Dr].

  inv_freq is theta^(-2i/Dr) under the default RoPE; `rope_scaling` may change it and scale
  cos and sin (see spac_jax/models/rope.py).
  """
  dim = x.shape[-1]
  inv_freq, factor = rope.frequencies(dim, theta, rope_scaling)
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)  # [T, Dr/2]
  angles = angles.reshape((1, angles.shape[0]) + (1,) * (x.ndim - 3) + (dim // 2,))
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (dim // 2, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  cos, sin = factor * jnp.cos(angles), factor * jnp.sin(angles)
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class LatentAttention(nnx.Module):
  """DeepSeek-V2 multi-head latent attention; module names follow the checkpoint's."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.nope_dim = cfg.qk_nope_head_dim
    self.rope_dim = cfg.head_dim
    self.v_dim = cfg.v_head_dim
    self.kv_lora_rank = cfg.kv_lora_rank
    self.rope_theta = cfg.rope_theta
    self.rope_scaling = cfg.rope_scaling
    # Softmax scale (Dn + Dr)^-0.5, times YaRN's mscale^2 when the checkpoint sets it.
    self.softmax_scale = ((cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
                          * rope.mla_softmax_factor(cfg.rope_scaling))
    q_size = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.head_dim)
    if cfg.q_lora_rank:
      self.q_proj = None
      self.q_a_proj = linear(cfg.d_model, cfg.q_lora_rank, rngs, cfg.qkv_bias)
      self.q_a_layernorm = nnx.RMSNorm(cfg.q_lora_rank, epsilon=LATENT_NORM_EPS, rngs=rngs)
      self.q_b_proj = linear(cfg.q_lora_rank, q_size, rngs)
    else:
      self.q_proj = linear(cfg.d_model, q_size, rngs)
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
    self.kv_a_proj_with_mqa = linear(cfg.d_model, cfg.kv_lora_rank + cfg.head_dim, rngs,
                                      cfg.qkv_bias)
    self.kv_a_layernorm = nnx.RMSNorm(cfg.kv_lora_rank, epsilon=LATENT_NORM_EPS, rngs=rngs)
    self.kv_b_proj = linear(cfg.kv_lora_rank,
                             cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), rngs)
    self.o_proj = linear(cfg.num_heads * cfg.v_head_dim, cfg.d_model, rngs, cfg.o_bias)

  def _queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, T, H, Dn + Dr] queries with the rotary part rotated."""
    batch, length, _ = x.shape
    if self.q_proj is not None:
      q = self.q_proj(x)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q = q.reshape(batch, length, self.num_heads, self.nope_dim + self.rope_dim)
    q_rope = apply_rope_interleaved(q[..., self.nope_dim:], positions, self.rope_theta,
                                    self.rope_scaling)
    return jnp.concatenate([q[..., :self.nope_dim], q_rope], axis=-1)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | None = None,
               start: jax.Array | int = 0) -> tuple[jax.Array, LatentCache | None]:
    """Attend causally; same contract as `layers.Attention.__call__` with a LatentCache."""
    batch, length, _ = x.shape
    q = self._queries(x, positions)
    compressed = self.kv_a_proj_with_mqa(x)
    latent = self.kv_a_layernorm(compressed[..., :self.kv_lora_rank])  # [B, T, R]
    k_rope = apply_rope_interleaved(compressed[..., self.kv_lora_rank:], positions,
                                    self.rope_theta, self.rope_scaling)  # [B, T, Dr]

    if cache is None:
      key_positions = positions
    else:
      index = (0, start, 0)
      cache = LatentCache(
          jax.lax.dynamic_update_slice(cache.latent, latent.astype(cache.latent.dtype), index),
          jax.lax.dynamic_update_slice(cache.k_rope, k_rope.astype(cache.k_rope.dtype), index))
      latent, k_rope = cache.latent.astype(q.dtype), cache.k_rope.astype(q.dtype)
      key_positions = jnp.arange(latent.shape[1])

    positions_kv = latent.shape[1]
    kv = self.kv_b_proj(latent).reshape(batch, positions_kv, self.num_heads,
                                        self.nope_dim + self.v_dim)
    k_nope, values = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :],
                              (batch, positions_kv, self.num_heads, self.rope_dim))
    keys = jnp.concatenate([k_nope, k_rope], axis=-1)  # [B, S, H, Dn + Dr]

    scores = jnp.einsum('bthd,bshd->bhts', q, keys).astype(jnp.float32) * self.softmax_scale
    causal = key_positions[None, :] <= positions[:, None]  # [T, S]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum('bhts,bshd->bthd', probs, values)
    return self.o_proj(out.reshape(batch, length, self.num_heads * self.v_dim)), cache
