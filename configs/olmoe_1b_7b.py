"""OLMoE-1B-7B target (olmoe: 16 layers of 64 routed experts, top-8), autoregressive by default
because speculative mode needs a draft of a supported family (qwen3, qwen2, llama) with the
same tokenizer:

  python -m spac_jax.launch --config=configs/olmoe_1b_7b.py --workdir=runs/olmoe_1b_7b \\
      --config.model.path=/path/to/OLMoE-1B-7B-0924

With such a draft (50304-token vocabulary), add --config.decode.mode=speculative and
--config.draft.path=DIR.
"""

import ml_collections

from configs import hf_common


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = hf_common.get_config(variant)
  config.decode.mode = 'autoregressive'
  return config
