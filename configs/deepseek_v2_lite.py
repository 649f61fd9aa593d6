"""DeepSeek-V2-Lite target (deepseek_v2: multi-head latent attention, first layer dense, then
26 layers of 64 routed experts, top-6, plus 2 shared experts kept on the device).

It decodes autoregressively by default, because speculative mode needs a draft of a supported
family (qwen3, qwen2, llama) with the same tokenizer:

  python -m spac_jax.launch --config=configs/deepseek_v2_lite.py --workdir=runs/deepseek_v2_lite \\
      --config.model.path=/path/to/DeepSeek-V2-Lite

With such a draft (102400-token vocabulary), add --config.decode.mode=speculative and
--config.draft.path=DIR.
"""

import ml_collections

from configs import hf_common


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = hf_common.get_config(variant)
  config.decode.mode = 'autoregressive'
  return config
