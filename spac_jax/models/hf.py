"""Load a Hugging Face checkpoint directory (config.json plus safetensors) as a Transformer.

Layout read:
  config.json                    the model shape, mapped by `hf_config.to_model_config`
  model.safetensors              all tensors, or
  model.safetensors.index.json   a `weight_map` from tensor name to shard file

Loading streams one tensor at a time with `safetensors.safe_open`:
  1. Build the parameter tree of the Transformer abstractly (shapes only, no memory).
  2. For every non-expert parameter: read its tensor, check the shape, transpose Linear
     weights from [out, in] to [in, out], cast to the compute dtype and place it on the
     device.
  3. For every MoE layer and each of gate, up and down, preallocate one buffer of the whole
     stack ([E, D, F], or [E, F, D] for down). Fill it expert by expert, then place it in
     pinned_host (or on the device when `experts_on_host` is False). The buffer is freed
     before the next stack, so loading needs about one stack beyond the loaded model.
  4. Every tensor of the checkpoint must be used. A leftover one means an architecture option
     spac_jax does not implement, so it raises ValueError.
Files are opened (memory-mapped) per layer and again per expert stack, and closed after it,
so pages of the mapping read earlier do not stay resident.

Both expert layouts are read: the per-expert tensors of hub checkpoints
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`), and
the fused stacks that transformers 5.x keeps in memory (`mlp.experts.gate_up_proj` [E, 2F, D]
and `mlp.experts.down_proj` [E, D, F]).
"""

import contextlib
import dataclasses
import mmap
import pathlib
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx

from spac_jax.models import hf_config
from spac_jax.models.config import ModelConfig
from spac_jax.models.transformer import Transformer
from spac_jax.offload import memory

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Tensors some checkpoints carry that no computation reads.
_IGNORED = re.compile(r'.*rotary_emb\.inv_freq$')
_EXPERT_PROJECTIONS = ('gate', 'up', 'down')
# Per-expert tensor names of each projection: Qwen/OLMoE style, then Mixtral style.
_PER_EXPERT_NAMES = {'gate': ('gate_proj', 'w1'), 'up': ('up_proj', 'w3'),
                     'down': ('down_proj', 'w2')}


def is_hf_checkpoint(directory: str | pathlib.Path) -> bool:
  """Return whether `directory` contains config.json and safetensors weights."""
  directory = pathlib.Path(directory)
  return (directory / hf_config.CONFIG_FILE).is_file() and (
      (directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file())


def load_config(directory: str | pathlib.Path, max_seq_len: int | None = None) -> ModelConfig:
  """Read the ModelConfig of a Hugging Face checkpoint directory."""
  path = pathlib.Path(directory) / hf_config.CONFIG_FILE
  return hf_config.to_model_config(hf_config.read_json(path), path, max_seq_len)


class SafetensorsIndex:
  """Map from tensor name to checkpoint file, and streaming reads of single tensors."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self.files = self._tensor_files()
    self.unused = {name for name in self.files if not _IGNORED.match(name)}
    self._open: dict[pathlib.Path, object] = {}
    self._stack: contextlib.ExitStack | None = None
    self._outer_stacks: list[contextlib.ExitStack | None] = []

  def _tensor_files(self) -> dict[str, pathlib.Path]:
    index_path = self.directory / INDEX_FILE
    if index_path.is_file():
      weight_map = hf_config.read_json(index_path).get('weight_map')
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f'{index_path} has no weight_map; it must map every tensor name to '
                         'its shard file.')
      files = {name: self.directory / file for name, file in weight_map.items()}
      for path in sorted(set(files.values())):
        if not path.is_file():
          raise FileNotFoundError(f'Shard {path.name} listed in {index_path} not found.')
      return files
    path = self.directory / SINGLE_FILE
    if not path.is_file():
      raise FileNotFoundError(f'{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}.')
    with self._opened(path) as handle:
      return {name: path for name in handle.keys()}

  @contextlib.contextmanager
  def _opened(self, path: pathlib.Path) -> Iterator:
    try:
      with safetensors.safe_open(str(path), framework='numpy') as handle:
        yield handle
    except safetensors.SafetensorError as error:
      raise ValueError(f'Cannot read safetensors file {path}: {error}. The file is truncated '
                       'or corrupt; copy or download it again.') from error

  @contextlib.contextmanager
  def session(self) -> Iterator[None]:
    """Keep files open across reads until the block ends, then unmap them.

    A nested session opens its own handles and restores the outer ones when it ends, so the
    pages it read leave the process's resident set before the outer session goes on.
    """
    outer = self._open
    self._open = {}
    self._outer_stacks.append(self._stack)
    try:
      with contextlib.ExitStack() as stack:
        self._stack = stack
        yield
    finally:
      self._open = outer
      self._stack = self._outer_stacks.pop() if self._outer_stacks else None

  def _handle(self, path: pathlib.Path):
    if path not in self._open:
      if self._stack is None:
        raise RuntimeError('SafetensorsIndex reads need an open session().')
      self._open[path] = self._stack.enter_context(self._opened(path))
    return self._open[path]

  def has(self, name: str) -> bool:
    return name in self.files

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

  def read(self, name: str, index: int | None = None) -> np.ndarray:
    """Read tensor `name` (only row `index` of its first axis when given)."""
    if name not in self.files:
      raise ValueError(f'Tensor {name} not found in the checkpoint {self.directory}; the '
                       'checkpoint is incomplete or does not match its config.json.')
    self.unused.discard(name)
    handle = self._handle(self.files[name])
    try:
      if index is None:
        return handle.get_tensor(name)
      return handle.get_slice(name)[index]
    except safetensors.SafetensorError as error:
      raise ValueError(f'Cannot read tensor {name} from {self.files[name]}: {error}. The file '
                       'is truncated or corrupt.') from error


@dataclasses.dataclass(frozen=True)
class _Target:
  """Source of one parameter: an HF tensor name, transposed if it is a Linear weight."""

  name: str
  transpose: bool


def _moe_prefix(index: SafetensorsIndex, layer: int) -> str:
  """Return the MoE block's prefix: `mlp.`, or `block_sparse_moe.` in Mixtral hub files."""
  mixtral = f'model.layers.{layer}.block_sparse_moe.'
  return mixtral if index.has(f'{mixtral}gate.weight') else f'model.layers.{layer}.mlp.'


def _source(path: tuple, index: SafetensorsIndex) -> _Target:
  """Return the HF tensor of non-expert parameter `path` (keys of the nnx parameter tree)."""
  keys = [str(key) for key in path]
  leaf = keys[-1]
  suffix = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'embedding': 'weight'}[leaf]
  transpose = leaf == 'kernel'

  if keys[0] == 'embed':
    return _Target('model.embed_tokens.weight', False)
  if keys[0] == 'final_norm':
    return _Target('model.norm.weight', False)
  if keys[0] == 'lm_head':
    return _Target('lm_head.weight', True)

  layer = int(keys[1])
  prefix = f'model.layers.{layer}.'
  module = keys[2:-1]
  if module == ['input_norm']:
    return _Target(f'{prefix}input_layernorm.weight', False)
  if module == ['post_attention_norm']:
    return _Target(f'{prefix}post_attention_layernorm.weight', False)
  if module[0] == 'attn':
    return _Target(f'{prefix}self_attn.{module[1]}.{suffix}', transpose)

  moe = _moe_prefix(index, layer)
  if module == ['ffn', 'router']:
    return _Target(f'{moe}gate.weight', True)
  if module[:2] == ['ffn', 'shared']:
    if module[2] == 'gate':
      return _Target(f'{moe}shared_expert_gate.weight', True)
    # Qwen2-MoE has one `shared_expert`; DeepSeek-V2 fuses its `shared_experts` into one MLP.
    plural = index.has(f'{moe}shared_experts.{module[3]}.{suffix}')
    return _Target(f'{moe}shared_expert{"s" if plural else ""}.{module[3]}.{suffix}', True)
  return _Target(f'{prefix}mlp.{module[1]}.{suffix}', transpose)  # Dense MLP.


def _read_checked(index: SafetensorsIndex, target: _Target, expected: tuple[int, ...],
                  dtype: np.dtype) -> np.ndarray:
  """Read one tensor, transpose it if needed, check its shape and cast it."""
  array = index.read(target.name)
  if target.transpose:
    array = array.T
  if array.shape != expected:
    raise ValueError(f'Tensor {target.name} in {index.files[target.name]} has shape '
                     f'{array.T.shape if target.transpose else array.shape}, but config.json '
                     f'implies {expected[::-1] if target.transpose else expected}; the '
                     'checkpoint does not match its config.json.')
  return array.astype(dtype, copy=False)


def _expert_stack(index: SafetensorsIndex, layer: int, projection: str, cfg: ModelConfig,
                  dtype: np.dtype) -> np.ndarray:
  """Fill one layer's [E, D, F] (gate, up) or [E, F, D] (down) stack expert by expert."""
  d, f = cfg.d_model, cfg.expert_dim
  shape = (cfg.num_experts, f, d) if projection == 'down' else (cfg.num_experts, d, f)
  buffer = _page_aligned_empty(shape, dtype)
  prefix = _moe_prefix(index, layer) + 'experts.'
  fused = f'{prefix}gate_up_proj' if projection != 'down' else f'{prefix}down_proj'
  if index.has(fused):
    rows = slice(0, f) if projection == 'gate' else slice(f, 2 * f)
    fused_shape = (cfg.num_experts, 2 * f, d) if projection != 'down' else (cfg.num_experts, d, f)
    if index.shape(fused) != fused_shape:
      raise ValueError(f'Tensor {fused} in {index.files[fused]} has shape {index.shape(fused)}, '
                       f'but config.json implies {fused_shape}; the checkpoint does not match '
                       'its config.json.')
    for expert in range(cfg.num_experts):
      weight = index.read(fused, expert)  # [2F, D] or [D, F]
      buffer[expert] = (weight if projection == 'down' else weight[rows]).T
    return buffer
  names = [f'{prefix}0.{name}.weight' for name in _PER_EXPERT_NAMES[projection]]
  style = next((n for n, name in zip(_PER_EXPERT_NAMES[projection], names) if index.has(name)),
               _PER_EXPERT_NAMES[projection][0])
  for expert in range(cfg.num_experts):
    target = _Target(f'{prefix}{expert}.{style}.weight', True)
    buffer[expert] = _read_checked(index, target, shape[1:], dtype)
  return buffer


def _page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Return an uninitialised array in its own anonymous memory mapping.

  It replaces np.empty for two reasons. The mapping goes back to the OS as soon as the last
  reference goes, whereas a large malloc'd buffer can stay in the heap after free. And JAX on
  CPU places a page-aligned array without copying it (checked with jax 0.10.2), so the stack
  is never in memory twice. On an accelerator the placement copies, then the mapping is freed.
  """
  size = int(np.prod(shape)) * dtype.itemsize
  return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype, count=int(np.prod(shape))
                       ).reshape(shape)


def _place(array: np.ndarray, memory_kind: str) -> jax.Array:
  return jax.device_put(array, memory.sharding(memory_kind))


def load(directory: str | pathlib.Path, dtype: str = 'float32', experts_on_host: bool = True,
         max_seq_len: int | None = None) -> Transformer:
  """Load a Hugging Face checkpoint directory as a Transformer.

  Args:
    directory: contains config.json and model.safetensors or model.safetensors.index.json.
    dtype: compute dtype of every parameter ('float32', 'bfloat16' or 'float16'); the
      checkpoint's tensors are cast to it.
    experts_on_host: place the routed expert stacks in pinned_host (for OffloadedTarget);
      False keeps them on the device (for the dense reference, DeviceModel).
    max_seq_len: KV cache length; None means the checkpoint's max_position_embeddings.

  Raises:
    FileNotFoundError: config.json or the weights are missing.
    ValueError: an unsupported model_type or option, a missing, extra or misshapen tensor,
      or a truncated or corrupt safetensors file. The message names the field, tensor or
      file.
  """
  directory = pathlib.Path(directory)
  cfg = load_config(directory, max_seq_len)
  np_dtype = _numpy_dtype(dtype)
  index = SafetensorsIndex(directory)
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract_model)
  params = nnx.state(abstract_model, nnx.Param).to_pure_dict()
  expert_kind = memory.PINNED_HOST if experts_on_host else memory.DEVICE

  def load_leaf(prefix: tuple, path, leaf) -> jax.Array:
    keys = prefix + tuple(getattr(p, 'key', getattr(p, 'idx', None)) for p in path)
    if len(keys) == 4 and keys[2] == 'ffn' and keys[3] in _EXPERT_PROJECTIONS:
      with index.session():  # Unmaps this stack's pages before the next stack is read.
        stack = _expert_stack(index, int(keys[1]), keys[3], cfg, np_dtype)
      return _place(stack, expert_kind)
    target = _source(keys, index)
    return _place(_read_checked(index, target, tuple(leaf.shape), np_dtype), memory.DEVICE)

  loaded = {}
  for key, subtree in params.items():
    prefixes = ([(('layers', layer), layer_tree) for layer, layer_tree in subtree.items()]
                if key == 'layers' else [((key,), subtree)])
    for prefix, tree in prefixes:
      with index.session():  # Unmaps the files after each layer.
        loaded_tree = jax.tree_util.tree_map_with_path(
            lambda path, leaf, prefix=prefix: load_leaf(prefix, path, leaf), tree)
      if key == 'layers':
        loaded.setdefault('layers', {})[prefix[1]] = loaded_tree
      else:
        loaded[key] = loaded_tree
  if cfg.tie_embeddings:
    index.unused.discard('lm_head.weight')  # Some tied checkpoints store the copy anyway.
  if index.unused:
    raise ValueError(f'The checkpoint {directory} has tensors spac_jax does not use, e.g. '
                     f'{sorted(index.unused)[:5]}; its architecture has options this loader '
                     'does not implement.')
  nnx.replace_by_pure_dict(state, loaded)
  return nnx.merge(graphdef, state)


def _numpy_dtype(dtype: str) -> np.dtype:
  if dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f"dtype={dtype!r} is invalid; use 'float32', 'bfloat16' or 'float16'.")
  return np.dtype(jnp.dtype(dtype))
