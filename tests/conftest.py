"""Shared fixtures: tiny random checkpoints written by the tests themselves."""

import pathlib

import pytest
from flax import nnx

from spac_jax.models import checkpoint
from spac_jax.models.config import ModelConfig
from spac_jax.models.transformer import Transformer

TINY_TARGET = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, max_seq_len=128, num_experts=8, top_k=2,
                          expert_dim=16)
TINY_DRAFT = ModelConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, max_seq_len=128, mlp_dim=64)


@pytest.fixture(scope='session')
def tiny_checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Random-weight target and draft checkpoints: {'target': dir, 'draft': dir}."""
  root = tmp_path_factory.mktemp('checkpoints')
  paths = {}
  for name, cfg, seed in (('target', TINY_TARGET, 1), ('draft', TINY_DRAFT, 2)):
    paths[name] = root / name
    checkpoint.save(Transformer(cfg, nnx.Rngs(seed)), paths[name])
  return paths
