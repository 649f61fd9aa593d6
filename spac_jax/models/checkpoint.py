"""Save and restore a model (shape plus parameters) with orbax-checkpoint.

Layout of a checkpoint directory:
  model_config.json   the ModelConfig fields
  params/             an orbax StandardCheckpointer tree of the parameters
"""

import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from spac_jax.models.config import ModelConfig
from spac_jax.models.transformer import Transformer

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'

# Maps a parameter path (tuple of keys) and its abstract value to the sharding to restore into.
ShardingFn = Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding]


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Raise absl's threshold to WARNING, because orbax logs every step of a save or load."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def save(model: Transformer, directory: str | pathlib.Path) -> None:
  """Write the model's config and parameters to `directory` (which must not hold params)."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(model.cfg.to_json() + '\n')
  params = nnx.state(model, nnx.Param).to_pure_dict()
  with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, params)


def load_config(directory: str | pathlib.Path) -> ModelConfig:
  directory = pathlib.Path(directory)
  config_path = directory / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f'Checkpoint directory {directory} has no {CONFIG_FILE}. Point the config at a '
        'directory written by spac_jax.train (or spac_jax.models.checkpoint.save).')
  try:
    values = json.loads(config_path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f'{config_path} is not valid JSON ({error}).') from error
  if not isinstance(values, dict):
    raise ValueError(f'{config_path} must contain a JSON object of ModelConfig fields.')
  try:
    return ModelConfig.from_dict(values)
  except TypeError as error:  # Missing required fields.
    raise ValueError(f'{config_path} is incomplete: {error}.') from error


def load(directory: str | pathlib.Path, sharding_fn: ShardingFn | None = None
         ) -> Transformer:
  """Restore a Transformer; `sharding_fn` chooses each parameter's placement (memory kind).

  The parameters are restored straight into the chosen shardings, so arrays placed in
  `pinned_host` never pass through device memory.
  """
  directory = pathlib.Path(directory).absolute()
  cfg = load_config(directory)
  if not (directory / PARAMS_DIR).is_dir():
    raise FileNotFoundError(f'Checkpoint directory {directory} has no {PARAMS_DIR}/ folder.')
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  abstract_params = nnx.state(abstract_model, nnx.Param).to_pure_dict()
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def with_sharding(path, leaf):
    sharding = sharding_fn(path, leaf) if sharding_fn else default
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  target = jax.tree_util.tree_map_with_path(
      lambda path, leaf: with_sharding(tuple(_key(p) for p in path), leaf), abstract_params)
  try:
    with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(directory / PARAMS_DIR, target)
  except Exception as error:  # orbax and tensorstore raise many types for a bad checkpoint.
    text = str(error).strip()
    first_line = text.splitlines()[0].split(' See full')[0][:200] if text else ''
    raise ValueError(
        f'Cannot restore parameters from {directory / PARAMS_DIR}: {type(error).__name__}: '
        f'{first_line}. The folder is damaged or does not match {CONFIG_FILE}; rewrite it with '
        'spac_jax.train or spac_jax.models.checkpoint.save.') from error
  params = jax.tree.map(_retype_memory_kind, params)
  nnx.replace_by_pure_dict(abstract_state, params)
  return nnx.merge(graphdef, abstract_state)


def _retype_memory_kind(array: jax.Array) -> jax.Array:
  """Give a restored host array the memory space its sharding names.

  NOTE: with orbax-checkpoint 0.12.8 and jax 0.10.2, an array restored into a `pinned_host`
  sharding reports that sharding but `jit` traces it as device memory. One copy into the
  same sharding (may_alias=False) fixes the type; it costs one array's size at a time.
  """
  if array.sharding.memory_kind in (None, 'device'):
    return array
  return jax.device_put(array, array.sharding, may_alias=False)


def _key(entry) -> str | int:
  for attribute in ('key', 'idx', 'name'):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return str(entry)
