"""Train the embedded target and draft models with optax.

  python -m spac_jax.train --config=configs/train_embedded.py --workdir=runs/train_embedded

Writes `target/` and `draft/` checkpoints and `training.json` (command, steps, wall time,
train and validation loss per evaluation, final expert load per layer) into the workdir.
"""

import json
import pathlib
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from spac_jax.data import corpus
from spac_jax.data.tokenizer import ByteTokenizer
from spac_jax.models import checkpoint
from spac_jax.models.config import ModelConfig
from spac_jax.models.transformer import Transformer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory for checkpoints and logs.')


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(graphdef, optimizer: optax.GradientTransformation, aux_weight: float,
                    capacity_factor: float):
  """Build a jitted step (params, opt_state, windows [B, T+1]) -> (params, opt_state, metrics)."""

  def loss_fn(params, windows):
    model = nnx.merge(graphdef, params)
    logits, aux = model(windows[:, :-1], capacity_factor)
    lm_loss = cross_entropy(logits, windows[:, 1:])
    return lm_loss + aux_weight * aux, (lm_loss, aux)

  @partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, windows):
    grads, (lm_loss, aux) = jax.grad(loss_fn, has_aux=True)(params, windows)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {'loss': lm_loss, 'aux_loss': aux,
                               'grad_norm': optax.global_norm(grads)}

  return train_step


def make_eval_fn(graphdef):
  """Validation loss without capacity drops (MoE layers use the dense reference)."""

  @jax.jit
  def eval_loss(params, windows):
    model = nnx.merge(graphdef, params)
    caches = model.init_caches(windows.shape[0])
    logits, _ = model.decode(windows[:, :-1], caches, jnp.int32(0))
    return cross_entropy(logits, windows[:, 1:])

  return eval_loss


def expert_load(model: Transformer, windows: np.ndarray) -> list[list[float]]:
  """Fraction of top-k picks that go to each expert, per MoE layer, on `windows`."""
  loads = []
  tokens = jnp.asarray(windows[:, :-1])
  positions = jnp.arange(tokens.shape[1])
  h = model.embed(tokens)
  for layer in model.layers:
    h, _ = layer.attention_block(h, positions, None, 0)
    x = layer.post_attention_norm(h).reshape(-1, h.shape[-1])
    if not layer.is_moe:
      h = h + layer.ffn(x).reshape(h.shape)
      continue
    routing = layer.ffn.route(x)
    counts = np.bincount(np.asarray(routing.expert_ids).reshape(-1),
                         minlength=model.cfg.num_experts)
    loads.append((counts / counts.sum()).round(4).tolist())
    h = h + layer.ffn.dense_reference(x).reshape(h.shape)
  return loads


def train_model(name: str, model_cfg: ModelConfig, section: ml_collections.ConfigDict,
                config: ml_collections.ConfigDict, train_stream: np.ndarray,
                eval_windows: np.ndarray) -> tuple[Transformer, dict]:
  """Train one model and return it with its training record."""
  model = Transformer(model_cfg, nnx.Rngs(config.seed))
  counts = model_cfg.param_counts()
  logging.info('%s: %d parameters (%d active per token).', name, counts['total'],
               counts['active'])
  schedule = optax.warmup_cosine_decay_schedule(0.0, section.learning_rate,
                                                config.warmup_steps, section.steps,
                                                section.learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=config.weight_decay))
  graphdef, params = nnx.split(model)
  opt_state = optimizer.init(params)
  train_step = make_train_step(graphdef, optimizer, config.aux_loss_weight,
                               config.capacity_factor)
  eval_loss = make_eval_fn(graphdef)
  rng = np.random.default_rng(config.seed)

  history = []
  start = time.perf_counter()
  progress = tqdm.trange(1, section.steps + 1, desc=f'train {name}', unit='step')
  for step in progress:
    windows = corpus.sample_windows(train_stream, config.batch_size, config.seq_len, rng)
    params, opt_state, metrics = train_step(params, opt_state, jnp.asarray(windows))
    if step % config.eval_every == 0 or step == section.steps:
      metrics = jax.device_get(metrics)
      val = float(np.mean([eval_loss(params, jnp.asarray(eval_windows[i:i + config.batch_size]))
                           for i in range(0, len(eval_windows), config.batch_size)]))
      record = {'step': step, 'train_loss': float(metrics['loss']), 'validation_loss': val,
                'aux_loss': float(metrics['aux_loss']),
                'elapsed_s': round(time.perf_counter() - start, 1)}
      history.append(record)
      progress.set_postfix(loss=f"{record['train_loss']:.3f}", val=f'{val:.3f}')
      logging.info('%s step %d: %s', name, step, record)
  wall_time = time.perf_counter() - start

  model = nnx.merge(graphdef, params)
  summary = {'param_counts': counts, 'steps': section.steps,
             'learning_rate': section.learning_rate, 'wall_time_s': round(wall_time, 1),
             'history': history}
  if model_cfg.is_moe:
    summary['expert_load'] = expert_load(model, eval_windows[:4])
  return model, summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError('Both --config and --workdir are required.')
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError('--workdir must name a directory, e.g. --workdir=runs/train_embedded.')
  existing = [f'{workdir}/{name}' for name in ('target', 'draft')
              if pathlib.Path(workdir, name).exists()]
  if existing:
    # Checked before training, because the save at the end would fail on them.
    raise app.UsageError(f'{", ".join(existing)} already exist; choose a new --workdir or '
                         'remove them.')
  logging.info('jax %s on %s', jax.__version__, jax.devices())
  tokenizer = ByteTokenizer()
  train_stream = corpus.load_split('train', config.validation_fraction, tokenizer)
  val_stream = corpus.load_split('validation', config.validation_fraction, tokenizer)
  logging.info('Corpus: %d train tokens, %d validation tokens.', len(train_stream),
               len(val_stream))
  eval_rng = np.random.default_rng(config.seed + 1)
  eval_windows = corpus.sample_windows(val_stream, config.eval_batches * config.batch_size,
                                       config.seq_len, eval_rng)

  record = {'command': ' '.join(['python -m spac_jax.train'] + sys.argv[1:]),
            'jax_version': jax.__version__, 'devices': [str(d) for d in jax.devices()],
            'config': config.to_dict(), 'train_tokens': int(len(train_stream)),
            'validation_tokens': int(len(val_stream))}
  for name in ('target', 'draft'):
    section = config[name]
    model_cfg = ModelConfig.from_dict(section.model.to_dict())
    model, record[name] = train_model(name, model_cfg, section, config, train_stream,
                                      eval_windows)
    checkpoint.save(model, f'{workdir}/{name}')
    logging.info('Saved %s to %s/%s', name, workdir, name)
  with open(f'{workdir}/training.json', 'w') as f:
    json.dump(record, f, indent=2)
  logging.info('Wrote %s/training.json', workdir)


if __name__ == '__main__':
  app.run(main)
