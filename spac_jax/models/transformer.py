"""Decoder-only transformer (Qwen3, Qwen3-MoE and related families) as a Flax NNX module."""

import jax
import jax.numpy as jnp
from flax import nnx

from spac_jax.models.config import ModelConfig
from spac_jax.models.layers import Attention, DenseMLP, KVCache
from spac_jax.models.mla import LatentAttention, LatentCache
from spac_jax.models.moe import MoEBlock


AttentionCache = KVCache | LatentCache


def init_cache(cfg: ModelConfig, batch: int = 1, dtype=jnp.float32) -> AttentionCache:
  """Return a zeroed attention cache of one layer: keys and values, or MLA latents."""
  if cfg.attention == 'mla':
    return LatentCache.zeros(cfg, batch, dtype)
  return KVCache.zeros(cfg, batch, dtype)


def lm_logits(cfg: ModelConfig, embed: nnx.Embed, final_norm: nnx.RMSNorm,
              lm_head: nnx.Linear | None, h: jax.Array) -> jax.Array:
  """Final norm and LM head (the transposed embedding when tied): [..., D] -> [..., V] f32."""
  h = final_norm(h)
  logits = embed.attend(h) if cfg.tie_embeddings else lm_head(h)
  return logits.astype(jnp.float32)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)).

  `ffn` is an MoEBlock in MoE layers and a DenseMLP in the others (see
  `ModelConfig.is_moe_layer`).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, is_moe: bool):
    self.input_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.attn = LatentAttention(cfg, rngs) if cfg.attention == 'mla' else Attention(cfg, rngs)
    self.post_attention_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.is_moe = is_moe
    self.ffn = MoEBlock(cfg, rngs) if is_moe else DenseMLP(cfg.d_model, cfg.mlp_dim, rngs)

  def attention_block(self, x: jax.Array, positions: jax.Array, cache: AttentionCache | None,
                      start: jax.Array | int) -> tuple[jax.Array, AttentionCache | None]:
    """Return the residual stream after attention, and the updated cache."""
    attn_out, cache = self.attn(self.input_norm(x), positions, cache, start)
    return x + attn_out, cache


class Transformer(nnx.Module):
  """Token embedding, decoder layers, final norm and a (tied) LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # TODO: unit-variance tied embeddings start training at about 50 nats per token against
    # ln(V) for uniform logits. A smaller scale changes what train_embedded.py reproduces.
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs, cfg.is_moe_layer(i))
                            for i in range(cfg.num_layers)])
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
      if layer.is_moe:
        y, aux = layer.ffn(x, capacity_factor)
        aux_losses.append(aux)
      else:
        y = layer.ffn(x)
      h = h + y.reshape(batch, length, -1)
    aux_loss = jnp.mean(jnp.stack(aux_losses)) if aux_losses else jnp.zeros(())
    return self.logits(h), aux_loss

  def decode(self, tokens: jax.Array, caches: list[AttentionCache], start: jax.Array
             ) -> tuple[jax.Array, list[AttentionCache]]:
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
      y = layer.ffn.dense_reference(x) if layer.is_moe else layer.ffn(x)
      h = h + y.reshape(batch, length, -1)
      new_caches.append(cache)
    return self.logits(h), new_caches

  @property
  def dtype(self) -> jnp.dtype:
    """The parameters' dtype (the embedding's), which the attention caches use too."""
    return self.embed.embedding[...].dtype

  def init_caches(self, batch: int = 1) -> list[AttentionCache]:
    return [init_cache(self.cfg, batch, self.dtype) for _ in range(self.cfg.num_layers)]
