"""Stage configs from config dicts.

Every stage takes a frozen, self-validating dataclass (`SeedingConfig`,
`DreamingConfig`, `BaselineConfig`, ...). An entry point builds it from the
matching block of its ml_collections config through `from_dict`, which
names the block in every error, so a misspelt key fails at config time
with the valid ones listed, not as a TypeError at the first step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def dataclass_from_dict(cls, values: Mapping[str, Any], key: str):
  """`cls(**values)`, failing first on keys `cls` does not have."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f'{key}: unknown keys {unknown}; valid: {sorted(fields)}.')
  return cls(**dict(values))


def with_overrides(base, overrides: Mapping[str, Any], key: str):
  """`base` with some fields replaced, through `type(base).from_dict` so
  the overrides are checked and normalised like any config."""
  current = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
  unknown = sorted(set(overrides) - set(current))
  if unknown:
    raise ValueError(f'{key}: unknown keys {unknown}; valid: '
                     f'{sorted(current)}.')
  return type(base).from_dict({**current, **overrides}, key=key)
