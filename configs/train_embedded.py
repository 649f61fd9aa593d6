"""Train the embedded target (MoE) and draft (dense) models on the standard library's source.

Command (about 60 minutes on a 2-core CPU):
  python -m spac_jax.train --config=configs/train_embedded.py --workdir=runs/train_embedded

The checkpoints shipped in checkpoints/embedded/ came from this config; its README records
the steps, wall time, losses and measured acceptance. `:smoke` shrinks the run to seconds for
tests: `--config=configs/train_embedded.py:smoke`.
"""

import ml_collections


def _target() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.vocab_size = 259  # 256 byte values plus BOS, EOS and PAD.
  model.d_model = 128
  model.num_layers = 4
  model.num_heads = 4
  model.num_kv_heads = 2
  model.head_dim = 32
  model.max_seq_len = 1024  # KV cache length at inference; training windows are shorter.
  model.num_experts = 32  # Routed experts per MoE layer.
  model.top_k = 4
  model.expert_dim = 64  # Fine-grained experts: each is half the width of d_model.
  return model


def _draft() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.vocab_size = 259
  model.d_model = 96
  model.num_layers = 2
  model.num_heads = 3
  model.num_kv_heads = 1
  model.head_dim = 32
  model.max_seq_len = 1024
  model.mlp_dim = 256
  return model


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.validation_fraction = 0.02  # Share of standard-library files held out.
  config.seq_len = 512  # Tokens per training window.
  config.batch_size = 16  # Windows per step.
  config.aux_loss_weight = 0.01  # Weight of the MoE load-balancing loss.
  config.capacity_factor = 2.0  # Expert buffer slack during training.
  config.weight_decay = 0.01
  config.warmup_steps = 100
  config.eval_every = 200  # Steps between validation-loss evaluations.
  config.eval_batches = 8  # Validation batches per evaluation.

  config.target = ml_collections.ConfigDict()
  config.target.model = _target()
  config.target.steps = 1200
  config.target.learning_rate = 3e-3

  config.draft = ml_collections.ConfigDict()
  config.draft.model = _draft()
  config.draft.steps = 1000
  config.draft.learning_rate = 3e-3

  if variant == 'smoke':
    config.seq_len = 32
    config.batch_size = 2
    config.warmup_steps = 1
    config.eval_every = 2
    config.eval_batches = 1
    config.target.steps = config.draft.steps = 3
    for model in (config.target.model, config.draft.model):
      model.max_seq_len = 64
    config.target.model.num_experts = 8
    config.target.model.top_k = 2
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of train_embedded; use '' or 'smoke'.")
  return config
