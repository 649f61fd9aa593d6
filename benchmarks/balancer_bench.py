"""Time the HiGHS workload balancer on one layer and on a whole 48-layer model.

Command (about 5 s on a 2-core CPU with one core busy):
  python benchmarks/balancer_bench.py

Every solve gets a fresh random instance with 128 experts per layer and K = 5. Levels follow
a skewed distribution (most experts at level 0, few at the top), residency favours high
levels as a running cache would, and predicted tokens are W * level / K for a verification
window W = 8. The device cache has room for `--cache_fraction` of the experts, and the transfer
budget is 8 experts per layer per pass. The cost constants are an illustrative profile of a
9 MB expert (host link about 25 GB/s, CPU memory about 20 GB/s), not a measurement. The
table reports the wall time of `WorkloadBalancer.solve` (grouping, HiGHS and decoding) and of
`solve_greedy`, and how far the greedy pass time lies above the HiGHS optimum.
"""

import importlib.metadata

from absl import app
from absl import flags
import numpy as np

from spac_jax.scheduling.balancer import CostModel, WorkloadBalancer, solve_greedy

_LAYER_SOLVES = flags.DEFINE_integer('layer_solves', 2000, 'Solves of the one-layer case.')
_MODEL_SOLVES = flags.DEFINE_integer('model_solves', 500, 'Solves of the 48-layer case.')
_TIME_LIMIT_S = flags.DEFINE_float(
    'time_limit_s', 1.0, 'HiGHS time limit per solve in seconds. Large by default so that the '
    'benchmark times complete solves rather than fallbacks.')
_THREADS = flags.DEFINE_integer('threads', 1, 'HiGHS worker threads; 0 keeps the HiGHS default.')
_CACHE_FRACTION = flags.DEFINE_float('cache_fraction', 0.25,
                                     'Device cache slots as a fraction of all experts.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random instances.')

MAX_LEVEL = 5
NUM_EXPERTS = 128
WINDOW = 8
LEVEL_PROBABILITIES = (0.55, 0.2, 0.1, 0.07, 0.05, 0.03)  # Levels 0..5.
RESIDENT_PROBABILITY = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9)  # Chance of being cached, by level.
TRANSFERS_PER_LAYER = 8
COST = CostModel(device_fixed_ms=0.02, device_per_token_ms=0.002, cpu_fixed_ms=0.5,
                 cpu_per_token_ms=0.1, transfer_ms=0.4, source='profile')


def random_instance(rng: np.random.Generator, num_layers: int) -> dict:
  """Draw levels, predicted tokens, residency and limits for one pass."""
  shape = (num_layers, NUM_EXPERTS)
  levels = rng.choice(MAX_LEVEL + 1, size=shape, p=LEVEL_PROBABILITIES)
  resident = rng.random(shape) < np.asarray(RESIDENT_PROBABILITY)[levels]
  return dict(levels=levels, predicted_tokens=WINDOW * levels / MAX_LEVEL, resident=resident,
              capacity=int(_CACHE_FRACTION.value * num_layers * NUM_EXPERTS),
              transfer_budget=TRANSFERS_PER_LAYER * num_layers)


def time_case(num_layers: int, solves: int, balancer: WorkloadBalancer,
              rng: np.random.Generator) -> dict:
  """Solve `solves` fresh instances with HiGHS and with the greedy heuristic."""
  highs_ms, greedy_ms, fallbacks, gaps = [], [], 0, []
  for _ in range(solves):
    instance = random_instance(rng, num_layers)
    result = balancer.solve(**instance)
    greedy = solve_greedy(COST, MAX_LEVEL, **instance)
    highs_ms.append(result.solve_time_ms)
    greedy_ms.append(greedy.solve_time_ms)
    fallbacks += int(result.solver != 'highs')
    gaps.append(greedy.objective_ms / result.objective_ms - 1.0)
  return dict(highs_ms=np.array(highs_ms), greedy_ms=np.array(greedy_ms), fallbacks=fallbacks,
              greedy_gap=np.array(gaps))


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  balancer = WorkloadBalancer(COST, MAX_LEVEL, time_limit_s=_TIME_LIMIT_S.value,
                              threads=_THREADS.value or None)
  # One untimed solve builds the Highs instance and starts the HiGHS thread pool.
  balancer.solve(**random_instance(rng, 1))

  threads = _THREADS.value or 'HiGHS default'
  print(f'highspy {importlib.metadata.version("highspy")}, threads={threads}, '
        f'time_limit_s={_TIME_LIMIT_S.value}, cache_fraction={_CACHE_FRACTION.value}')
  print()
  print('| case | solves | solve median ms | solve p99 ms | solve max ms | greedy median ms | '
        'greedy objective over optimum, mean / max | fallbacks |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for name, num_layers, solves in (('1 layer x 128 experts', 1, _LAYER_SOLVES.value),
                                   ('48 layers x 128 experts', 48, _MODEL_SOLVES.value)):
    stats = time_case(num_layers, solves, balancer, rng)
    print(f'| {name} | {solves} | {np.median(stats["highs_ms"]):.3f} | '
          f'{np.percentile(stats["highs_ms"], 99):.3f} | '
          f'{np.max(stats["highs_ms"]):.3f} | {np.median(stats["greedy_ms"]):.3f} | '
          f'+{100 * stats["greedy_gap"].mean():.3f} % / +{100 * stats["greedy_gap"].max():.3f} % | '
          f'{stats["fallbacks"]} |', flush=True)


if __name__ == '__main__':
  app.run(main)
