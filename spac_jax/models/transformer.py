"""Decoder-only transformer (Qwen3 / Qwen3-MoE family) as a Flax NNX module."""

import jax
import jax.numpy as jnp
from flax import nnx

from spac_jax.models.config import ModelConfig
from spac_jax.models.layers import Attention, DenseMLP, KVCache
from spac_jax.models.moe import MoEBlock


def lm_logits(cfg: ModelConfig, embed: nnx.Embed, final_norm: nnx.RMSNorm,
              lm_head: nnx.Linear | None, h: jax.Array) -> jax.Array:
  """Final norm and LM head (the transposed embedding when tied): [..., D] -> [..., V] f32."""
  h = final_norm(h)
  logits = embed.attend(h) if cfg.tie_embeddings else lm_head(h)
  return logits.astype(jnp.float32)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs)
    self.post_attention_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.ffn = MoEBlock(cfg, rngs) if cfg.is_moe else DenseMLP(cfg, rngs)

  def attention_block(self, x: jax.Array, positions: jax.Array, cache: KVCache | None,
                      start: jax.Array | int) -> tuple[jax.Array, KVCache | None]:
    """Return the residual stream after attention, and the updated cache."""
    attn_out, cache = self.attn(self.input_norm(x), positions, cache, start)
    return x + attn_out, cache


class Transformer(nnx.Module):
  """Token embedding, decoder layers, final norm and a (tied) LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.lm_head = (None if cfg.tie_embeddings else
                    nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs))

  def logits(self, h: jax.Array) -> jax.Array:
    """Project final hidden states [..., D] to vocabulary logits [..., V] in float32."""
    return lm_logits(self.cfg, self.embed, self.final_norm, self.lm_head, h)

  def __call__(self, tokens: jax.Array, capacity_factor: float = 2.0
               ) -> tuple[jax.Array, jax.Array]:
    """Training forward over tokens [B, T]; returns logits [B, T, V] and the mean MoE aux loss."""
    batch, length = tokens.shape
    positions = jnp.arange(length)
    h = self.embed(tokens)
    aux_losses = []
    for layer in self.layers:
      h, _ = layer.attention_block(h, positions, None, 0)
      x = layer.post_attention_norm(h).reshape(batch * length, -1)
      if self.cfg.is_moe:
        y, aux = layer.ffn(x, capacity_factor)
        aux_losses.append(aux)
      else:
        y = layer.ffn(x)
      h = h + y.reshape(batch, length, -1)
    aux_loss = jnp.mean(jnp.stack(aux_losses)) if aux_losses else jnp.zeros(())
    return self.logits(h), aux_loss

  def decode(self, tokens: jax.Array, caches: list[KVCache], start: jax.Array
             ) -> tuple[jax.Array, list[KVCache]]:
    """Run tokens [B, T] at positions start..start+T-1 against KV caches.

    MoE layers use the drop-free dense reference, so this is the all-on-device reference
    for the offloaded target and the decoding path of dense drafts.
    """
    batch, length = tokens.shape
    positions = start + jnp.arange(length)
    h = self.embed(tokens)
    new_caches = []
    for layer, cache in zip(self.layers, caches):
      h, cache = layer.attention_block(h, positions, cache, start)
      x = layer.post_attention_norm(h).reshape(batch * length, -1)
      y = layer.ffn.dense_reference(x) if self.cfg.is_moe else layer.ffn(x)
      h = h + y.reshape(batch, length, -1)
      new_caches.append(cache)
    return self.logits(h), new_caches

  def init_caches(self, batch: int = 1) -> list[KVCache]:
    return [KVCache.zeros(self.cfg, batch) for _ in range(self.cfg.num_layers)]
