"""Checks of an experiment config, each failing with the bad value and what to do."""

import pathlib

import ml_collections

from spac_jax.data.prompts import SOURCES
from spac_jax.policies import POLICIES
from spac_jax.scheduling.cost_model import profile_from_config

MODES = ('autoregressive', 'speculative')
OVERLONG = ('truncate', 'reject')
COST_MODELS = ('profile', 'measure')
FORMATS = ('auto', 'orbax', 'hf')
DTYPES = ('float32', 'bfloat16', 'float16')
CHAT_TEMPLATES = ('', 'checkpoint')


class ConfigError(ValueError):
  """An experiment config field has an invalid value."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _checkpoint_dir(path: str, field: str) -> None:
  _require(bool(path), f'config.{field} is empty; set it to a checkpoint directory.')
  directory = pathlib.Path(path)
  _require(directory.is_dir(), f'config.{field}={path!r}: checkpoint directory not found. '
           'Point it at a directory written by spac_jax.train (e.g. checkpoints/embedded/target) '
           'or at a Hugging Face checkpoint directory (config.json plus safetensors).')


def _validate_checkpoint_options(config: ml_collections.ConfigDict) -> None:
  """Check the optional fields of Hugging Face checkpoints (absent in configs/default.py)."""
  for field, value, allowed in (
      ('model.format', config.model.get('format', 'auto'), FORMATS),
      ('draft.format', config.draft.get('format', 'auto'), FORMATS),
      ('model.dtype', config.model.get('dtype', 'float32'), DTYPES),
      ('data.chat_template', config.data.get('chat_template', ''), CHAT_TEMPLATES)):
    _require(value in allowed, f'config.{field}={value!r} is invalid; choose one of '
             f'{list(allowed)}.')
  max_seq_len = config.model.get('max_seq_len', 0)
  _require(isinstance(max_seq_len, int) and max_seq_len >= 0,
           f'config.model.max_seq_len={max_seq_len!r} is invalid; use 0 (the checkpoint\'s '
           'max_position_embeddings) or a positive KV cache length in tokens.')


def _validate_spac(spac: ml_collections.ConfigDict) -> None:
  _require(isinstance(spac.levels, int) and spac.levels >= 1,
           f'config.spac.levels={spac.levels!r} is invalid; it must be an integer >= 1.')
  _require(isinstance(spac.transfer_budget, int) and spac.transfer_budget >= -1,
           f'config.spac.transfer_budget={spac.transfer_budget!r} is invalid; use -1 (the '
           'cache size) or a number of experts >= 0.')
  _require(spac.transfer_amortization >= 1, f'config.spac.transfer_amortization='
           f'{spac.transfer_amortization!r} is invalid; it must be >= 1 (passes a copy serves).')
  _require(spac.solver_time_limit_ms > 0, f'config.spac.solver_time_limit_ms='
           f'{spac.solver_time_limit_ms!r} is invalid; it must be > 0.')
  _require(spac.cost_model in COST_MODELS, f'config.spac.cost_model={spac.cost_model!r} is '
           f'invalid; choose one of {list(COST_MODELS)}.')
  try:
    profile_from_config(spac.profile)
  except (TypeError, ValueError) as error:
    raise ConfigError(f'config.spac.profile is invalid: {error}') from error


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError on the first invalid field of an experiment config."""
  decode, offload, data = config.decode, config.offload, config.data
  _require(decode.mode in MODES,
           f'config.decode.mode={decode.mode!r} is invalid; choose one of {list(MODES)}.')
  _require(isinstance(decode.draft_len, int) and decode.draft_len >= 0,
           f'config.decode.draft_len={decode.draft_len!r} is invalid; it must be an integer '
           '>= 0 (draft tokens proposed per verification pass).')
  _require(offload.policy in POLICIES, f'config.offload.policy={offload.policy!r} is unknown; '
           f'choose one of {sorted(POLICIES)}.')
  _require(0.0 <= offload.cache_ratio <= 1.0,
           f'config.offload.cache_ratio={offload.cache_ratio!r} is outside [0, 1]; it is the '
           'fraction of all routed experts that fit in the device cache.')
  _require(data.source in SOURCES,
           f'config.data.source={data.source!r} is unknown; choose one of {list(SOURCES)}.')
  _require(data.source != 'jsonl' or bool(data.path),
           "config.data.source='jsonl' needs config.data.path set to a JSONL prompt file.")
  _require(isinstance(data.max_new_tokens, int) and data.max_new_tokens >= 1,
           f'config.data.max_new_tokens={data.max_new_tokens!r} is invalid; it must be >= 1.')
  _require(isinstance(data.num_prompts, int),
           f'config.data.num_prompts={data.num_prompts!r} must be an integer (<= 0 means all).')
  _require(data.overlong_prompts in OVERLONG, f'config.data.overlong_prompts='
           f'{data.overlong_prompts!r} is invalid; choose one of {list(OVERLONG)}.')
  _validate_spac(config.spac)
  _validate_checkpoint_options(config)
  _checkpoint_dir(config.model.path, 'model.path')
  if decode.mode == 'speculative':
    _checkpoint_dir(config.draft.path, 'draft.path')
