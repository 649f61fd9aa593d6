"""Shared settings of the Hugging Face checkpoint configs (qwen3_30b_a3b.py and others).

Every field of configs/default.py stays, plus:
  model.format         'hf': config.json plus safetensors ('auto' would detect it too)
  model.dtype          compute and storage dtype of every weight: 'bfloat16', 'float16' or
                       'float32' (safetensors tensors are cast to it while loading)
  model.max_seq_len    KV cache length in tokens; 0 means the checkpoint's
                       max_position_embeddings
  draft.format         'hf'
  data.chat_template   '' tokenises prompts as is; 'checkpoint' wraps each prompt as one user
                       message with the chat template in the target's tokenizer_config.json
The checkpoint directories have no default: pass --config.model.path=DIR (and
--config.draft.path=DIR in speculative mode); validation names a missing one.
"""

import ml_collections

from configs import default


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = default.get_config(variant)
  config.model.path = ''  # Hugging Face checkpoint directory of the target (required).
  config.model.format = 'hf'
  config.model.dtype = 'bfloat16'
  config.model.max_seq_len = 4096
  config.draft.path = ''  # Hugging Face checkpoint directory of the draft (speculative mode).
  config.draft.format = 'hf'
  config.data.chat_template = ''
  return config
