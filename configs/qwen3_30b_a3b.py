"""Qwen3-30B-A3B target (qwen3_moe: 48 layers of 128 routed experts, top-8) with a Qwen3
dense draft of the same tokenizer, e.g. Qwen3-0.6B:

  python -m spac_jax.launch --config=configs/qwen3_30b_a3b.py --workdir=runs/qwen3_30b_a3b \\
      --config.model.path=/path/to/Qwen3-30B-A3B --config.draft.path=/path/to/Qwen3-0.6B

See configs/hf_common.py for the checkpoint fields.
"""

import ml_collections

from configs import hf_common


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  return hf_common.get_config(variant)
