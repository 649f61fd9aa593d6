"""Qwen3-235B-A22B target (qwen3_moe: 94 layers of 128 routed experts, top-8) with a Qwen3
dense draft of the same tokenizer, e.g. Qwen3-1.7B:

  python -m spac_jax.launch --config=configs/qwen3_235b_a22b.py --workdir=runs/qwen3_235b \\
      --config.model.path=/path/to/Qwen3-235B-A22B --config.draft.path=/path/to/Qwen3-1.7B

Its routed experts in bfloat16 take about 420 GiB of host memory (94 layers x 128 experts x
3 x 4096 x 1536 parameters x 2 bytes), so the cache covers a smaller share by default.
"""

import ml_collections

from configs import hf_common


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = hf_common.get_config(variant)
  config.offload.cache_ratio = 0.1
  return config
