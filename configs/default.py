"""Main job: speculative decoding over the offloaded embedded MoE, on HumanEval prompts.

Command (about 20 seconds on a 2-core CPU):
  python -m spac_jax.launch --config=configs/default.py --workdir=runs/default

Any field can be overridden, e.g. `--config.offload.policy=on_demand` or
`--config.decode.draft_len=8`. `:smoke` runs two prompts of 8 tokens for tests.
Expected on the embedded model (20 HumanEval prompts, lru, cache_ratio 0.25, draft_len 4):
mean accepted length 3.44 and expert hit rate 0.043; docs/results.md records the full run.
"""

import pathlib

import ml_collections

from spac_jax.policies import spac

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.path = str(REPO / 'checkpoints' / 'embedded' / 'target')  # MoE target checkpoint.

  config.draft = ml_collections.ConfigDict()
  config.draft.path = str(REPO / 'checkpoints' / 'embedded' / 'draft')  # Used in speculative mode.

  config.decode = ml_collections.ConfigDict()
  config.decode.mode = 'speculative'  # 'autoregressive' or 'speculative' (greedy either way).
  config.decode.draft_len = 4  # Draft tokens proposed per verification pass.

  config.offload = ml_collections.ConfigDict()
  config.offload.policy = 'lru'  # 'all_on_device', 'on_demand', 'lru' or 'spac'.
  config.offload.cache_ratio = 0.25  # Device cache slots as a fraction of all routed experts.

  config.spac = spac.default_config()  # Settings of policy 'spac'.

  config.data = ml_collections.ConfigDict()
  config.data.source = 'humaneval'  # 'humaneval', 'spec_bench' or 'jsonl'.
  config.data.path = ''  # JSONL file for source 'jsonl' (optional for 'spec_bench').
  config.data.num_prompts = 20  # First N prompts of the source; <= 0 means all.
  config.data.max_new_tokens = 64  # Generated tokens per prompt, at most.
  config.data.overlong_prompts = 'truncate'  # 'truncate' (keep the end) or 'reject'.

  if variant == 'smoke':
    config.data.num_prompts = 2
    config.data.max_new_tokens = 8
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of configs/default.py; use '' or 'smoke'.")
  return config
