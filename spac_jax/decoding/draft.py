"""The dense draft model, kept whole on the device and run as one jitted call per window."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spac_jax.models.transformer import AttentionCache, Transformer, init_cache
from spac_jax.offload import memory


@partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _decode_greedy(graphdef, state, tokens, caches, start):
  """Greedy next token at every position of tokens [W], and the updated caches."""
  model = nnx.merge(graphdef, state)
  logits, caches = model.decode(tokens[None], caches, start)
  return jnp.argmax(logits[0], axis=-1).astype(jnp.int32), caches


class DeviceModel:
  """A Transformer with all weights and KV caches in device memory.

  Used for the draft and, in tests, as the no-offload reference of the target (MoE layers
  then run every expert densely, a separate code path from the offloaded engine).
  """

  def __init__(self, model: Transformer):
    self.cfg = model.cfg
    self._graphdef, state = nnx.split(model)
    self._state = memory.to_device(state)
    self.dtype = model.dtype
    self.caches = self.init_caches()

  def init_caches(self) -> list[AttentionCache]:
    return [memory.to_device(init_cache(self.cfg, 1, self.dtype))
            for _ in range(self.cfg.num_layers)]

  def forward(self, tokens: np.ndarray, start: int, num_valid: int) -> np.ndarray:
    """Run tokens [W] at cache position `start`; return greedy predictions [num_valid]."""
    predictions, self.caches = _decode_greedy(self._graphdef, self._state,
                                              jnp.asarray(tokens, jnp.int32), self.caches,
                                              jnp.int32(start))
    return np.asarray(predictions)[:num_valid]
