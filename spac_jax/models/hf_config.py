"""Map a Hugging Face `config.json` to a ModelConfig.

Supported `model_type` values and what they set:
  qwen3_moe  per-head q/k RMSNorm, softmax top-k router (renormalised if norm_topk_prob),
             dense layers from decoder_sparse_step and mlp_only_layers.
  qwen3      the dense Qwen3 (drafts).
  llama      dense, no q/k norm, optional attention biases (drafts).
  qwen2      dense, no q/k norm, q/k/v biases (drafts of Qwen1.5/Qwen2 MoE targets).
  mixtral    no q/k norm, top-k weights always renormalised.
  qwen2_moe  q/k/v biases, shared expert behind a sigmoid gate, norm_topk_prob off by default.
  olmoe      q/k RMSNorm over the whole projection, optional clip_qkv.
  deepseek_v2  multi-head latent attention, shared experts, the first first_k_dense_replace
             layers dense, greedy or group-limited greedy routing times routed_scaling_factor,
             never renormalised (transformers 5.25.0 ignores norm_topk_prob for deepseek_v2).

Files written by different transformers versions spell some fields differently, so every
field is read under each spelling in `_ALIASES` (for example transformers 5.x writes
`num_local_experts` and `rope_parameters: {rope_theta: ...}` where 4.x wrote `num_experts`
and `rope_theta`). Options that would change the computation but are not implemented
(sliding-window attention, RoPE types other than default, linear, llama3 and yarn, biased
MLPs, other activations) raise ValueError naming the field instead of loading a model that
computes something else.
"""

import json
import pathlib
from typing import Any

from spac_jax.models import rope
from spac_jax.models.config import ModelConfig

CONFIG_FILE = 'config.json'
GENERATION_CONFIG_FILE = 'generation_config.json'
MOE_FAMILIES = ('qwen3_moe', 'mixtral', 'qwen2_moe', 'olmoe', 'deepseek_v2')
DENSE_FAMILIES = ('qwen3', 'llama', 'qwen2')
FAMILIES = MOE_FAMILIES + DENSE_FAMILIES

# Spellings of one field across transformers versions and families, preferred first.
_ALIASES = {
    'num_experts': ('num_experts', 'num_local_experts', 'n_routed_experts'),
    'top_k': ('num_experts_per_tok', 'moe_top_k'),
    'num_layers': ('num_hidden_layers', 'n_layer', 'num_layers'),
    'num_heads': ('num_attention_heads', 'n_head'),
}
_MISSING = object()


def read_json(path: pathlib.Path) -> dict[str, Any]:
  """Read a JSON object from `path`, naming the file in every error."""
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found; a Hugging Face checkpoint directory needs '
                            f'{CONFIG_FILE} and model.safetensors (or a sharded index).')
  try:
    values = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{path} is not valid JSON: {error}.') from error
  if not isinstance(values, dict):
    raise ValueError(f'{path} must contain a JSON object, got {type(values).__name__}.')
  return values


class _Fields:
  """Reads fields of one config.json, naming the file and field in errors."""

  def __init__(self, values: dict[str, Any], path: pathlib.Path):
    self.values = values
    self.path = path

  def get(self, name: str, default: Any = _MISSING) -> Any:
    """Value of `name` under any of its spellings; `default` when absent or null."""
    for spelling in _ALIASES.get(name, (name,)):
      if self.values.get(spelling) is not None:
        return self.values[spelling]
    if default is _MISSING:
      spellings = ' or '.join(_ALIASES.get(name, (name,)))
      raise ValueError(f'{self.path} has no field {spellings}, which model_type '
                       f'{self.values.get("model_type")!r} needs.')
    return default

  def reject(self, name: str, supported: Any, explanation: str) -> None:
    """Raise when field `name` is present with a value other than `supported`."""
    value = self.values.get(name)
    if value is not None and value != supported:
      raise ValueError(f'{self.path}: {name}={value!r} is not supported ({explanation}); '
                       f'spac_jax implements only {name}={supported!r}.')


def rope_fields(fields: _Fields) -> dict[str, Any]:
  """RoPE base and scaling from `rope_parameters` (transformers 5.x) or `rope_theta` and
  `rope_scaling` (4.x, where the type may be spelled `type`).

  Raises:
    ValueError: a rope_type other than those in `rope.ROPE_TYPES`, or a non-numeric parameter.
  """
  merged = {**(fields.values.get('rope_scaling') or {}),
            **(fields.values.get('rope_parameters') or {})}
  theta = float(merged.pop('rope_theta', fields.values.get('rope_theta', 10000.0)))
  rope_type = merged.pop('rope_type', merged.pop('type', 'default'))
  if rope_type not in rope.ROPE_TYPES:
    raise ValueError(f'{fields.path}: rope_type={rope_type!r}, which is not supported; spac_jax '
                     f'implements {list(rope.ROPE_TYPES)}.')
  if rope_type == 'default':
    return {'rope_theta': theta, 'rope_scaling': ()}
  scaling = {'rope_type': rope_type}
  for name, value in merged.items():
    if not isinstance(value, (int, float, bool)) and value is not None:
      raise ValueError(f'{fields.path}: RoPE parameter {name}={value!r} is not supported; '
                       f'rope_type {rope_type!r} takes numbers only.')
    if value is not None:
      scaling[name] = value
  rope.frequencies(2, theta, tuple(sorted(scaling.items())))  # Names a missing parameter.
  return {'rope_theta': theta, 'rope_scaling': tuple(sorted(scaling.items()))}


def _check_common_options(fields: _Fields) -> None:
  fields.reject('hidden_act', 'silu', 'the experts and MLPs are SwiGLU with SiLU')
  fields.reject('mlp_bias', False, 'MLP projections have no bias')
  fields.reject('use_sliding_window', False, 'attention is full causal attention')
  model_type = fields.values['model_type']
  if model_type in ('mixtral', 'llama') and fields.values.get('sliding_window') is not None:
    raise ValueError(f'{fields.path}: sliding_window={fields.values["sliding_window"]!r} is '
                     'not supported because spac_jax implements only full causal attention; '
                     'use a checkpoint whose config.json sets sliding_window to null.')


def _attention_fields(fields: _Fields) -> dict[str, Any]:
  """Shape and norm options of the attention, shared by every family."""
  model_type = fields.values['model_type']
  d_model = int(fields.get('hidden_size'))
  num_heads = int(fields.get('num_heads'))
  head_dim = int(fields.get('head_dim', d_model // num_heads))
  attention_bias = bool(fields.get('attention_bias', False))

  values = {
      'vocab_size': int(fields.get('vocab_size')),
      'd_model': d_model,
      'num_layers': int(fields.get('num_layers')),
      'num_heads': num_heads,
      'num_kv_heads': int(fields.get('num_key_value_heads', num_heads)),
      'head_dim': head_dim,
      **rope_fields(fields),
      'norm_eps': float(fields.get('rms_norm_eps', 1e-6)),
      'tie_embeddings': bool(fields.get('tie_word_embeddings', False)),
      'qk_norm': {'qwen3_moe': 'head', 'qwen3': 'head', 'olmoe': 'full'}.get(model_type, 'none'),
      'qkv_bias': attention_bias,
      'o_bias': attention_bias,
  }

  if model_type == 'qwen2_moe':
    # Qwen2-MoE has q/k/v biases and never an o_proj bias; transformers 4.x had no field.
    values['qkv_bias'] = bool(fields.get('qkv_bias', True))
    values['o_bias'] = False
  if model_type == 'qwen2':
    values['qkv_bias'], values['o_bias'] = True, False  # Fixed in transformers' Qwen2.
  if model_type == 'deepseek_v2':
    values.update(_latent_attention_fields(fields))
  if model_type == 'olmoe':
    clip = fields.get('clip_qkv', None)
    values['clip_qkv'] = None if clip is None else float(clip)
    if head_dim * num_heads != d_model:
      raise ValueError(f'{fields.path}: OLMoE needs head_dim * num_attention_heads == '
                       f'hidden_size, got {head_dim} * {num_heads} != {d_model}.')
  return values


def _latent_attention_fields(fields: _Fields) -> dict[str, Any]:
  """DeepSeek-V2's MLA shape; head_dim is the rotary part, as transformers sets it."""
  return {
      'attention': 'mla',
      'q_lora_rank': int(fields.get('q_lora_rank', 0)),
      'kv_lora_rank': int(fields.get('kv_lora_rank')),
      'qk_nope_head_dim': int(fields.get('qk_nope_head_dim')),
      'head_dim': int(fields.get('qk_rope_head_dim')),
      'v_head_dim': int(fields.get('v_head_dim')),
      'num_kv_heads': int(fields.get('num_heads')),
  }


def _deepseek_router_fields(fields: _Fields) -> dict[str, Any]:
  fields.reject('scoring_func', 'softmax', 'the router scores experts with a softmax')
  fields.reject('moe_layer_freq', 1, 'every layer after first_k_dense_replace is MoE')
  method = fields.get('topk_method', 'greedy')
  values = {'routed_scale': float(fields.get('routed_scaling_factor', 1.0)),
            'norm_topk_prob': False}
  if method == 'group_limited_greedy':
    values.update(router_groups=int(fields.get('n_group')),
                  router_topk_groups=int(fields.get('topk_group')))
  elif method != 'greedy':
    raise ValueError(f"{fields.path}: topk_method={method!r} is not supported; spac_jax "
                     "implements 'greedy' and 'group_limited_greedy'.")
  return values


def _moe_fields(fields: _Fields) -> dict[str, Any]:
  """Routed and shared expert options of an MoE family."""
  model_type = fields.values['model_type']
  values = {
      'num_experts': int(fields.get('num_experts')),
      'top_k': int(fields.get('top_k')),
      'norm_topk_prob': bool(fields.get('norm_topk_prob', False)),
  }
  if model_type in ('mixtral', 'olmoe'):
    # Every layer is MoE and the experts use intermediate_size.
    values['expert_dim'] = int(fields.get('intermediate_size'))
  if model_type == 'mixtral':
    values['norm_topk_prob'] = True  # Mixtral's router always renormalises.
  if model_type in ('mixtral', 'olmoe'):
    return values
  values['expert_dim'] = int(fields.get('moe_intermediate_size'))
  if model_type in ('qwen3_moe', 'qwen2_moe'):
    values.update(mlp_dim=int(fields.get('intermediate_size', 0)),
                  moe_layer_step=int(fields.get('decoder_sparse_step', 1)),
                  dense_layers=tuple(int(i) for i in fields.get('mlp_only_layers', ())))
  if model_type == 'qwen2_moe':
    values.update(shared_expert_dim=int(fields.get('shared_expert_intermediate_size')),
                  shared_expert_gate=True)
  if model_type == 'deepseek_v2':
    values.update(_deepseek_router_fields(fields),
                  mlp_dim=int(fields.get('intermediate_size')),
                  first_dense_layers=int(fields.get('first_k_dense_replace', 0)),
                  shared_expert_dim=values['expert_dim'] * int(fields.get('n_shared_experts', 0)))
  return values


def to_model_config(values: dict[str, Any], path: pathlib.Path,
                    max_seq_len: int | None = None) -> ModelConfig:
  """Build the ModelConfig described by config.json `values` (read from `path`).

  Args:
    values: the parsed config.json.
    path: the file, for error messages.
    max_seq_len: KV cache length; None means max_position_embeddings. A smaller value
      bounds the preallocated caches (a 32k-token cache of a large model is gigabytes).
  """
  fields = _Fields(values, path)
  model_type = values.get('model_type')
  if model_type not in FAMILIES:
    raise ValueError(f'{path}: model_type={model_type!r} is not supported; spac_jax loads '
                     f'{list(FAMILIES)}.')
  _check_common_options(fields)
  config = _attention_fields(fields)
  positions = int(fields.get('max_position_embeddings'))
  config['max_seq_len'] = min(positions, max_seq_len) if max_seq_len else positions
  if model_type in MOE_FAMILIES:
    config.update(_moe_fields(fields))
  else:
    config['mlp_dim'] = int(fields.get('intermediate_size'))
  return ModelConfig(**config)


def token_ids(directory: pathlib.Path) -> dict[str, list[int]]:
  """BOS, EOS and PAD ids of a checkpoint: generation_config.json first, then config.json.

  Returns:
    {'bos': [...], 'eos': [...], 'pad': [...]}, each list empty when neither file sets it.
    EOS may hold several ids (Qwen3 ends turns with <|im_end|> and text with <|endoftext|>).
  """
  sources = [read_json(directory / CONFIG_FILE)]
  generation_path = directory / GENERATION_CONFIG_FILE
  if generation_path.is_file():
    sources.insert(0, read_json(generation_path))
  ids = {}
  for key in ('bos', 'eos', 'pad'):
    value = next((s[f'{key}_token_id'] for s in sources
                  if s.get(f'{key}_token_id') is not None), None)
    ids[key] = [] if value is None else [int(i) for i in (
        value if isinstance(value, list) else [value])]
  return ids
