"""Expert cache policies; `make_policy(name, ...)` builds one by its config name."""

from spac_jax.policies.all_on_device import AllOnDevicePolicy
from spac_jax.policies.base import CachePolicy, PolicyOptions
from spac_jax.policies.lru import LRUPolicy
from spac_jax.policies.on_demand import OnDemandPolicy
from spac_jax.policies.spac import SpacPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    policy.name: policy for policy in (AllOnDevicePolicy, OnDemandPolicy, LRUPolicy, SpacPolicy)
}


def make_policy(name: str, cache, stats, options: PolicyOptions | None = None) -> CachePolicy:
  if name not in POLICIES:
    raise ValueError(f'Unknown offload policy {name!r}; choose one of {sorted(POLICIES)}.')
  return POLICIES[name](cache, stats, options or PolicyOptions())
