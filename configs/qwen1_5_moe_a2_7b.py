"""Qwen1.5-MoE-A2.7B target (qwen2_moe: 24 layers of 60 routed experts, top-4, plus a gated
shared expert kept on the device) with a dense draft of the same tokenizer in a supported
family (qwen2, qwen3 or llama), e.g. Qwen1.5-0.5B:

  python -m spac_jax.launch --config=configs/qwen1_5_moe_a2_7b.py --workdir=runs/qwen1_5_moe \\
      --config.model.path=/path/to/Qwen1.5-MoE-A2.7B --config.draft.path=/path/to/Qwen1.5-0.5B
"""

import ml_collections

from configs import hf_common


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  return hf_common.get_config(variant)
