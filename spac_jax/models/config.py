"""Model shape: one frozen, hashable dataclass shared by the target and the draft."""

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a decoder-only transformer in the Qwen3 family.

  A model with `num_experts > 0` uses an MoE feed-forward block in every layer
  (Qwen3-MoE style); one with `num_experts == 0` uses a dense SwiGLU MLP
  (Qwen3 dense style, used for drafts).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_seq_len: int
  mlp_dim: int = 0  # Hidden size of the dense SwiGLU MLP (dense models only).
  num_experts: int = 0  # Routed experts per MoE layer; 0 means a dense model.
  top_k: int = 0  # Experts chosen per token by the router.
  expert_dim: int = 0  # Hidden size of one SwiGLU expert.
  norm_topk_prob: bool = True  # Renormalise the top-k routing weights to sum to 1.
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True  # The LM head reuses the token embedding matrix.

  def __post_init__(self):
    positive = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                'max_seq_len')
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f'ModelConfig.{name} must be positive, got {getattr(self, name)}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'ModelConfig.num_heads={self.num_heads} must be a multiple of '
                       f'num_kv_heads={self.num_kv_heads} for grouped-query attention.')
    if self.head_dim % 2:
      raise ValueError(f'ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.')
    if self.is_moe:
      if not 0 < self.top_k <= self.num_experts:
        raise ValueError(f'ModelConfig.top_k={self.top_k} must be in [1, num_experts='
                         f'{self.num_experts}].')
      if self.expert_dim <= 0:
        raise ValueError(f'ModelConfig.expert_dim must be positive, got {self.expert_dim}.')
    elif self.mlp_dim <= 0:
      raise ValueError(f'A dense ModelConfig (num_experts=0) needs mlp_dim > 0, got {self.mlp_dim}.')

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def expert_param_count(self) -> int:
    """Parameters of one routed expert (gate, up and down projections)."""
    return 3 * self.d_model * self.expert_dim

  def param_counts(self) -> dict[str, int]:
    """Total and active (per-token) parameter counts."""
    attention = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    attention += 2 * self.head_dim + 2 * self.d_model  # q/k norms and the two layer norms.
    embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2) + self.d_model
    if self.is_moe:
      router = self.d_model * self.num_experts
      total_ffn = router + self.num_experts * self.expert_param_count
      active_ffn = router + self.top_k * self.expert_param_count
    else:
      total_ffn = active_ffn = 3 * self.d_model * self.mlp_dim
    return {
        'total': embed + self.num_layers * (attention + total_ffn),
        'active': embed + self.num_layers * (attention + active_ffn),
    }

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> 'ModelConfig':
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown ModelConfig fields {unknown}; known fields: {sorted(known)}.')
    return cls(**values)
