"""Facts about a run shared by train / eval / demo: package versions, peak memory, and the run's config.yaml."""

from __future__ import annotations

import contextlib
import importlib
import os
import resource
import sys
from pathlib import Path
from typing import Any

import yaml

from ..io import write_text
from . import HarnessError

RUN_CONFIG = "config.yaml"


def versions() -> dict[str, str]:
    """Versions of python, torch, transformers, peft and nora."""
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "nora"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # a missing optional package is just not reported
            continue
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: VmHWM from /proc/self/status, the high-water mark of this program's own address space. getrusage's
    ru_maxrss is not used there because it survives fork + exec: a child started by a 2 GB parent reports at least
    2 GB. Elsewhere: resource.getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux, bytes on macOS).
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def write_run_config(out_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Atomically write the resolved arguments of a run as YAML (`nora train --config` reads them back)."""
    path = Path(out_dir) / RUN_CONFIG
    write_text(path, yaml.safe_dump(config, sort_keys=True, default_flow_style=False))
    return path


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config.yaml file, or the config.yaml inside a run directory; {} if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_CONFIG
    if not path.is_file():
        return {}
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise HarnessError(f"{path} is not a YAML mapping of argument names to values.")
    return data
