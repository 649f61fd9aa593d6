"""Mixtral-8x7B target (mixtral: 32 layers of 8 routed experts, top-2) with a Llama-architecture
draft that uses Mixtral's 32000-token tokenizer:

  python -m spac_jax.launch --config=configs/mixtral_8x7b.py --workdir=runs/mixtral_8x7b \\
      --config.model.path=/path/to/Mixtral-8x7B-v0.1 --config.draft.path=/path/to/draft

Without such a draft, add --config.decode.mode=autoregressive.
"""

import ml_collections

from configs import hf_common


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  return hf_common.get_config(variant)
