"""Tiny random-weight Hugging Face checkpoints, built with `transformers` and saved to disk.

Every config (a family, or a family with one extra option such as a RoPE scaling) exercises
the family's own options: dense layers, head_dim different from hidden_size / heads, biases,
shared experts, clip_qkv. Weights are redrawn with a larger scale than transformers'
initialiser (std 0.02), so logits and routing are far from ties and greedy tokens do not
hinge on rounding. Norm weights are perturbed around 1, so a swapped norm tensor changes the
output.
"""

import json
import pathlib

import numpy as np
import tokenizers
import torch
import transformers

VOCAB = 96
MAX_POSITIONS = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, max_position_embeddings=MAX_POSITIONS,
               rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)

FAMILY_CONFIGS = {
    # Layer 0 dense (mlp_only_layers), untied embeddings, head_dim 16 != 32 / 4.
    'qwen3_moe': dict(model_type='qwen3_moe', num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=48,
                      moe_intermediate_size=16, num_experts=16, num_experts_per_tok=4,
                      norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False,
                      rope_theta=1e6),
    'qwen3': dict(model_type='qwen3', num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, intermediate_size=64,
                  tie_word_embeddings=True),
    'llama': dict(model_type='llama', num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, attention_bias=True,
                  tie_word_embeddings=True),
    'qwen2': dict(model_type='qwen2', num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False),
    # Llama 3 RoPE scaling; original_max_position_embeddings 16 so that it changes positions
    # below MAX_POSITIONS.
    'llama3_rope': dict(model_type='llama', num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                        rope_parameters=dict(rope_type='llama3', rope_theta=10000.0, factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16)),
    # YaRN on grouped-query attention: its attention factor scales cos and sin.
    'qwen3_yarn': dict(model_type='qwen3', num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, intermediate_size=64,
                       tie_word_embeddings=True,
                       rope_parameters=dict(rope_type='yarn', rope_theta=1e6, factor=4.0,
                                            original_max_position_embeddings=32)),
    'mixtral': dict(model_type='mixtral', num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=16, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False),
    # decoder_sparse_step 2: layers 1 and 3 are MoE, 0 and 2 dense.
    'qwen2_moe': dict(model_type='qwen2_moe', num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=2, tie_word_embeddings=False),
    # Low-rank queries, first layer dense, 2 shared experts, group-limited routing (4 groups,
    # 2 kept per token), routing weights scaled by 2.5, attention biases.
    'deepseek_v2': dict(model_type='deepseek_v2', num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16,
                        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
                        topk_method='group_limited_greedy', n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, attention_bias=True,
                        tie_word_embeddings=False),
    # The V2-Lite shape: queries projected directly, plain greedy top-k, YaRN RoPE.
    'deepseek_v2_lite': dict(model_type='deepseek_v2', num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                             v_head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                             first_k_dense_replace=1, topk_method='greedy',
                             tie_word_embeddings=False,
                             rope_parameters=dict(rope_type='yarn', rope_theta=10000.0,
                                                  factor=4.0, original_max_position_embeddings=32,
                                                  beta_fast=32, beta_slow=1, mscale=0.707,
                                                  mscale_all_dim=0.707)),
    'olmoe': dict(model_type='olmoe', num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=16, num_experts=8,
                  num_experts_per_tok=2, clip_qkv=1.5, tie_word_embeddings=False),
}


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
  values = {**_COMMON, **FAMILY_CONFIGS[family], **overrides}
  return transformers.AutoConfig.for_model(**values)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
  """Redraw every parameter: norms around 1, everything else N(0, std)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator)
      if 'norm' in name:
        parameter.copy_(1.0 + 0.2 * noise)
      else:
        parameter.copy_(std * noise)


def build(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A random-weight float32 model of `family`, in eval mode."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                                        dtype=torch.float32)
  randomize(model, seed)
  return model.eval()


def save(model: transformers.PreTrainedModel, directory: pathlib.Path) -> pathlib.Path:
  """save_pretrained (per-expert tensors, as on the hub) and return `directory`."""
  model.save_pretrained(directory)
  return directory


def save_fused(model: transformers.PreTrainedModel, directory: pathlib.Path) -> pathlib.Path:
  """Save the in-memory state dict as is: transformers 5.x's fused expert stacks
  (`mlp.experts.gate_up_proj`) instead of save_pretrained's per-expert tensors."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

  directory.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(directory)
  state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop('lm_head.weight', None)
  save_file(state, directory / 'model.safetensors', metadata={'format': 'pt'})
  return directory


def greedy_hf(model: transformers.PreTrainedModel, prompt: list[int], new_tokens: int
              ) -> list[int]:
  """transformers' own greedy generation, never stopping early."""
  with torch.no_grad():
    output = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
  return output[0, len(prompt):].tolist()


def logits_hf(model: transformers.PreTrainedModel, tokens: list[int]) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([tokens])).logits[0].numpy()


def rewrite_config(directory: pathlib.Path, edit) -> dict:
  """Apply `edit(values)` to directory/config.json in place and return the new values."""
  path = directory / 'config.json'
  values = json.loads(path.read_text())
  edit(values)
  path.write_text(json.dumps(values, indent=2))
  return values


def save_tokenizer(directory: pathlib.Path, vocab_size: int = VOCAB, bos: bool = True) -> None:
  """A word-level tokenizer over `vocab_size` ids: <bos>, <eos>, <pad>, then words w3, w4...

  With `bos`, the post-processor prepends <bos> (id 0) like Llama's tokenizer; without, the
  text is encoded as is, like Qwen's. Writes tokenizer.json and generation_config.json.
  """
  vocab = {'<bos>': 0, '<eos>': 1, '<pad>': 2}
  vocab.update({f'w{i}': i for i in range(3, vocab_size)})
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<pad>'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.decoder = tokenizers.decoders.WordPiece(prefix='##')
  if bos:
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single='<bos> $A', special_tokens=[('<bos>', 0)])
  tokenizer.add_special_tokens(['<bos>', '<eos>', '<pad>'])
  tokenizer.save(str(directory / 'tokenizer.json'))
  generation = {'bos_token_id': 0 if bos else None, 'eos_token_id': [1, 2], 'pad_token_id': 2}
  (directory / 'generation_config.json').write_text(json.dumps(generation))
