"""Per-module ranks: `rank_pattern` and `r_inner_pattern`, PEFT LoRA's `rank_pattern` for NoRA's two ranks.

A key is a regex matched against the end of a module's name (PEFT's `get_pattern_key`: ``"k_proj"`` matches
``model.layers.3.self_attn.k_proj``); the first key that matches wins, and a module no key matches uses `r` /
`r_inner`. Every layer is built from `module_config(config, name)`, a per-module view of the adapter's config, and a
compact adapter rebuilds its outer factors from the same view, so a saved `adapter_config.json` is all a reload needs.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

from peft.utils.other import get_pattern_key

PATTERN_FIELDS = ("rank_pattern", "r_inner_pattern")


def check(config) -> None:
    """Validate both pattern fields (None becomes {}); one clear error per problem."""
    for name in PATTERN_FIELDS:
        value = getattr(config, name)
        if value is None:
            setattr(config, name, {})
            continue
        if not isinstance(value, dict):
            raise ValueError(f"NoraConfig: {name} must be a dict of module-name pattern -> rank, got {value!r}.")
        for key, rank in value.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"NoraConfig: {name} keys must be non-empty module-name patterns, got {key!r}.")
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"NoraConfig: {name} key {key!r} is not a valid regex ({exc}).") from exc
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"NoraConfig: {name}[{key!r}] must be a positive integer, got {rank!r}.")
    if config.structure == "adapter" and config.r_inner_pattern:
        raise ValueError(
            "NoraConfig: r_inner_pattern has no effect with structure='adapter' (the trainable core R is r x r); "
            "set per-module core sizes with rank_pattern instead."
        )


def _lookup(pattern: dict[str, int], key: str, default: int) -> int:
    return pattern.get(get_pattern_key(pattern.keys(), key), default) if pattern else default


def ranks_for(config, key: str) -> tuple[int, int]:
    """(r, r_inner) of the module named `key`."""
    r = _lookup(config.rank_pattern, key, config.r)
    if config.structure == "adapter":
        return r, r
    r_inner = _lookup(config.r_inner_pattern, key, config.r_inner)
    if r_inner > r:
        raise ValueError(
            f"NoraConfig: module {key!r} gets r_inner={r_inner} > r={r} from rank_pattern / r_inner_pattern; the "
            f"nested update has rank <= min(r, r_inner), so give it r_inner <= {r} (an r_inner_pattern entry)."
        )
    return r, r_inner


def module_config(config, key: str):
    """The config `key`'s layer is built with: `config` itself, or a shallow copy with that module's ranks."""
    r, r_inner = ranks_for(config, key)
    if (r, r_inner) == (config.r, config.r_inner):
        return config
    view = copy.copy(config)
    view.r, view.r_inner = r, r_inner
    return view


def check_all_matched(config, targeted: Iterable[str]) -> None:
    """A pattern key that matches no targeted module is a typo or a wrong model: refuse it instead of ignoring it."""
    names = list(targeted)
    for field in PATTERN_FIELDS:
        for key in getattr(config, field):
            if not any(get_pattern_key([key], name) == key for name in names):  # the lookup's own matching
                raise ValueError(
                    f"NoraConfig: {field} key {key!r} matches none of the {len(names)} targeted modules (e.g. "
                    f"{names[0] if names else '(none)'}); a key matches the end of a module name. Fix or drop it."
                )
