"""Model shape: one frozen, hashable dataclass shared by the target and the draft."""

import dataclasses
import json
from typing import Any

QK_NORMS = ('head', 'full', 'none')
ATTENTIONS = ('gqa', 'mla')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a decoder-only transformer in the Qwen3 / Llama / Mixtral / Qwen2-MoE / OLMoE /
  DeepSeek-V2 families.

  A model with `num_experts > 0` uses an MoE feed-forward block in its MoE layers and a dense
  SwiGLU MLP of width `mlp_dim` in the others. Every layer is MoE unless `first_dense_layers`,
  `moe_layer_step` or `dense_layers` make it dense. One with `num_experts == 0` is dense
  throughout (used for drafts). The defaults describe the embedded Qwen3-style models.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_seq_len: int
  mlp_dim: int = 0  # Hidden size of the dense SwiGLU MLP (dense models and dense layers).
  num_experts: int = 0  # Routed experts per MoE layer; 0 means a dense model.
  top_k: int = 0  # Experts chosen per token by the router.
  expert_dim: int = 0  # Hidden size of one SwiGLU expert.
  norm_topk_prob: bool = True  # Renormalise the top-k routing weights to sum to 1.
  rope_theta: float = 10000.0
  # RoPE scaling parameters as sorted (name, value) pairs, e.g. (('factor', 8.0), ...,
  # ('rope_type', 'llama3')); empty means the default RoPE (see spac_jax/models/rope.py).
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  norm_eps: float = 1e-6
  tie_embeddings: bool = True  # The LM head reuses the token embedding matrix.
  # RMSNorm on queries and keys: 'head' normalises each head (Qwen3), 'full' the whole
  # projection before the split into heads (OLMoE), 'none' skips it (Llama, Mixtral).
  qk_norm: str = 'head'
  qkv_bias: bool = False  # Biases on the q, k and v projections (Qwen2-MoE, Llama option).
  o_bias: bool = False  # Bias on the attention output projection (Llama option).
  clip_qkv: float | None = None  # Clamp q, k and v to [-clip_qkv, clip_qkv] (OLMoE option).
  first_dense_layers: int = 0  # The first N layers use the dense MLP (DeepSeek style).
  moe_layer_step: int = 1  # Layer i is MoE only if (i + 1) % step == 0 (decoder_sparse_step).
  dense_layers: tuple[int, ...] = ()  # Layers that use the dense MLP (mlp_only_layers).
  shared_expert_dim: int = 0  # Hidden size of the always-on shared expert; 0 means none.
  shared_expert_gate: bool = False  # Scale the shared expert by sigmoid(x @ w) (Qwen2-MoE).
  routed_scale: float = 1.0  # Factor on the routing weights (routed_scaling_factor).
  # Group-limited routing (DeepSeek-V2 group_limited_greedy): experts form router_groups equal
  # groups, each token keeps the router_topk_groups groups with the highest expert score
  # and picks its top-k among their experts. 1 and 1 mean plain top-k.
  router_groups: int = 1
  router_topk_groups: int = 1
  # 'gqa' is grouped-query attention; 'mla' is DeepSeek-V2's multi-head latent attention,
  # where head_dim is the rotary part of each query/key head (qk_rope_head_dim).
  attention: str = 'gqa'
  q_lora_rank: int = 0  # MLA: rank of the query compression; 0 projects queries directly.
  kv_lora_rank: int = 0  # MLA: width of the cached key/value latent.
  qk_nope_head_dim: int = 0  # MLA: query/key dims without rotary embedding, per head.
  v_head_dim: int = 0  # MLA: value dims per head.

  def __post_init__(self):
    # JSON gives lists; a tuple keeps the config hashable (it is a static jit argument).
    object.__setattr__(self, 'dense_layers', tuple(int(i) for i in self.dense_layers))
    scaling = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else (
        self.rope_scaling)
    object.__setattr__(self, 'rope_scaling', tuple(sorted((str(k), v) for k, v in scaling)))
    positive = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                'max_seq_len', 'moe_layer_step')
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f'ModelConfig.{name} must be positive, got {getattr(self, name)}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'ModelConfig.num_heads={self.num_heads} must be a multiple of '
                       f'num_kv_heads={self.num_kv_heads} for grouped-query attention.')
    if self.head_dim % 2:
      raise ValueError(f'ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.')
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f'ModelConfig.qk_norm={self.qk_norm!r} is invalid; choose one of '
                       f'{list(QK_NORMS)}.')
    if self.clip_qkv is not None and self.clip_qkv <= 0:
      raise ValueError(f'ModelConfig.clip_qkv must be positive or None, got {self.clip_qkv}.')
    if self.attention not in ATTENTIONS:
      raise ValueError(f'ModelConfig.attention={self.attention!r} is invalid; choose one of '
                       f'{list(ATTENTIONS)}.')
    if self.attention == 'mla':
      self._validate_mla()
    if self.is_moe:
      self._validate_moe()
    elif self.mlp_dim <= 0:
      raise ValueError(f'A dense ModelConfig (num_experts=0) needs mlp_dim > 0, got {self.mlp_dim}.')

  def _validate_mla(self) -> None:
    for name in ('kv_lora_rank', 'qk_nope_head_dim', 'v_head_dim'):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive with attention='mla', got "
                         f'{getattr(self, name)}.')
    if self.qk_norm != 'none' or self.clip_qkv is not None:
      raise ValueError("attention='mla' has its own latent norms; set qk_norm='none' and "
                       'clip_qkv=None.')
    if self.num_kv_heads != self.num_heads:
      raise ValueError(f"attention='mla' needs num_kv_heads == num_heads={self.num_heads}, "
                       f'got {self.num_kv_heads}.')

  def _validate_moe(self) -> None:
    if not 0 < self.top_k <= self.num_experts:
      raise ValueError(f'ModelConfig.top_k={self.top_k} must be in [1, num_experts='
                       f'{self.num_experts}].')
    if self.expert_dim <= 0:
      raise ValueError(f'ModelConfig.expert_dim must be positive, got {self.expert_dim}.')
    if not self.moe_layers:
      raise ValueError(f'ModelConfig has num_experts={self.num_experts} but no MoE layer: '
                       f'first_dense_layers={self.first_dense_layers}, moe_layer_step='
                       f'{self.moe_layer_step} and dense_layers={self.dense_layers} cover all '
                       f'{self.num_layers} layers.')
    if len(self.moe_layers) < self.num_layers and self.mlp_dim <= 0:
      raise ValueError(f'ModelConfig has dense layers but mlp_dim={self.mlp_dim}; set mlp_dim '
                       'to the dense MLP width.')
    if self.shared_expert_gate and self.shared_expert_dim <= 0:
      raise ValueError('ModelConfig.shared_expert_gate needs shared_expert_dim > 0.')
    if self.router_groups < 1 or self.num_experts % self.router_groups:
      raise ValueError(f'ModelConfig.router_groups={self.router_groups} must be >= 1 and divide '
                       f'num_experts={self.num_experts}.')
    if not 1 <= self.router_topk_groups <= self.router_groups:
      raise ValueError(f'ModelConfig.router_topk_groups={self.router_topk_groups} must be in '
                       f'[1, router_groups={self.router_groups}].')
    kept = self.router_topk_groups * self.num_experts // self.router_groups
    if self.top_k > kept:
      raise ValueError(f'ModelConfig.top_k={self.top_k} exceeds the {kept} experts of the '
                       f'router_topk_groups={self.router_topk_groups} groups a token keeps.')

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """Return whether model layer `layer` has routed experts (the Hugging Face layer rule)."""
    return (self.is_moe and layer >= self.first_dense_layers
            and (layer + 1) % self.moe_layer_step == 0 and layer not in self.dense_layers)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Model layer indices of the MoE layers, in order; position = MoE layer index."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def expert_param_count(self) -> int:
    """Parameters of one routed expert (gate, up and down projections)."""
    return 3 * self.d_model * self.expert_dim

  def _attention_param_count(self) -> int:
    """Parameters of one attention block and the layer's two norms."""
    if self.attention == 'mla':
      q_size = self.num_heads * (self.qk_nope_head_dim + self.head_dim)
      kv_a = self.kv_lora_rank + self.head_dim
      query = (self.q_lora_rank * (self.d_model + 1 + q_size) + self.q_lora_rank * self.qkv_bias
               if self.q_lora_rank else self.d_model * q_size)
      latent = self.d_model * kv_a + kv_a * self.qkv_bias + self.kv_lora_rank
      expand = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
      out = self.num_heads * self.v_head_dim * self.d_model + self.d_model * self.o_bias
      return query + latent + expand + out + 2 * self.d_model
    q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attention = self.d_model * (2 * q_size + 2 * kv_size) + 2 * self.d_model
    attention += {'head': 2 * self.head_dim, 'full': q_size + kv_size, 'none': 0}[self.qk_norm]
    return attention + (q_size + 2 * kv_size) * self.qkv_bias + self.d_model * self.o_bias

  def param_counts(self) -> dict[str, int]:
    """Total and active (per-token) parameter counts."""
    attention = self._attention_param_count()
    embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2) + self.d_model
    dense_ffn = 3 * self.d_model * self.mlp_dim
    num_moe = len(self.moe_layers)
    shared = 3 * self.d_model * self.shared_expert_dim + self.d_model * self.shared_expert_gate
    router = self.d_model * self.num_experts + shared
    total_ffn = num_moe * (router + self.num_experts * self.expert_param_count)
    active_ffn = num_moe * (router + self.top_k * self.expert_param_count)
    dense_total = (self.num_layers - num_moe) * dense_ffn
    base = embed + self.num_layers * attention + dense_total
    return {'total': base + total_ffn, 'active': base + active_ffn}

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> 'ModelConfig':
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown ModelConfig fields {unknown}; known fields: {sorted(known)}.')
    return cls(**values)
