"""Model building blocks: MoE paths agree, config validation, checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spac_jax.models import checkpoint
from spac_jax.models.config import ModelConfig
from spac_jax.models.moe import MoEBlock, route
from spac_jax.models.transformer import Transformer

from conftest import TINY_TARGET


def test_moe_capacity_dispatch_matches_dense_reference():
  block = MoEBlock(TINY_TARGET, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (24, TINY_TARGET.d_model))
  # With capacity for every pair (factor E / k), dispatch drops nothing.
  factor = TINY_TARGET.num_experts / TINY_TARGET.top_k
  dispatched, aux = block(x, capacity_factor=factor)
  np.testing.assert_allclose(dispatched, block.dense_reference(x), rtol=1e-5, atol=1e-5)
  assert float(aux) >= 1.0 - 1e-5  # The balancing loss is at least 1, its uniform value.


def test_moe_capacity_drops_overflow_pairs():
  block = MoEBlock(TINY_TARGET, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (64, TINY_TARGET.d_model))
  tight, _ = block(x, capacity_factor=0.25)
  assert not np.allclose(tight, block.dense_reference(x), atol=1e-4)


def test_router_renormalises_top_k():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  routing = route(logits, top_k=2, norm_topk_prob=True)
  np.testing.assert_array_equal(routing.expert_ids, [[0, 1]])
  np.testing.assert_allclose(routing.weights.sum(-1), [1.0], rtol=1e-6)
  probs = jax.nn.softmax(logits[0])
  np.testing.assert_allclose(routing.weights[0], probs[:2] / probs[:2].sum(), rtol=1e-6)


def test_decode_with_cache_matches_full_forward():
  model = Transformer(TINY_TARGET, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 12)))
  full, _ = model.decode(tokens, model.init_caches(), jnp.int32(0))
  caches = model.init_caches()
  first, caches = model.decode(tokens[:, :7], caches, jnp.int32(0))
  rest, _ = model.decode(tokens[:, 7:], caches, jnp.int32(7))
  np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('field, value', [('top_k', 9), ('num_kv_heads', 3), ('head_dim', 15),
                                          ('expert_dim', 0), ('d_model', 0)])
def test_config_rejects_invalid_field(field, value):
  values = {**TINY_TARGET.__dict__, field: value}
  with pytest.raises(ValueError, match=field):
    ModelConfig(**values)


def test_config_rejects_unknown_field():
  with pytest.raises(ValueError, match='num_routed'):
    ModelConfig.from_dict({**TINY_TARGET.__dict__, 'num_routed': 3})


def test_checkpoint_round_trip(tmp_path):
  model = Transformer(TINY_TARGET, nnx.Rngs(3))
  checkpoint.save(model, tmp_path / 'ckpt')
  restored = checkpoint.load(tmp_path / 'ckpt')
  assert restored.cfg == TINY_TARGET
  original = nnx.state(model, nnx.Param).to_pure_dict()
  loaded = nnx.state(restored, nnx.Param).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, original, loaded)


def test_checkpoint_missing_directory_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='model_config.json'):
    checkpoint.load(tmp_path / 'nowhere')
