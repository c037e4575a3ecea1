"""Build steps that never leave a half-made folder: each is made in a temp folder beside its final
place and renamed into place once complete."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


def step(cache: Path, name: str, make, times: dict[str, float]) -> Path:
    """cache/name, made by make(tmp) in a temp folder renamed into place once complete; skipped
    (kept) when it exists. Records the step's wall time in `times`."""
    return steps(cache, [name], lambda tmps: make(tmps[name]), times)[name]


def steps(cache: Path, names: list[str], make, times: dict[str, float]) -> dict[str, Path]:
    """cache/name for each name; those missing are made together by make({name: tmp}) (work they
    share is done once) and renamed into place once all are complete. Records their wall time in
    `times` under their names joined by '+'."""
    finals = {name: cache / name for name in names}
    missing = [name for name in names if not finals[name].exists()]
    for name in names:
        if name not in missing:
            print(f"alignd: {finals[name]} exists, kept")
    if not missing:
        return finals
    for name in missing:
        for stale in cache.glob(f".{name}.*"):
            if not stale.name.endswith(".work"):
                shutil.rmtree(stale, ignore_errors=True)
    label = "+".join(missing)
    print(f"alignd: building {label}", flush=True)
    t0 = time.perf_counter()
    tmps = {name: Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache)) for name in missing}
    try:
        make(tmps)
        for name in missing:
            publish(tmps[name], finals[name])
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    times[label] = time.perf_counter() - t0
    print(f"alignd: {label} built in {times[label]:.0f} s", flush=True)
    return finals


def publish(tmp: Path, final: Path) -> None:
    # mkdtemp (and the safetensors writer) leave owner-only modes; a cache is for reading.
    for dirpath, dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    tmp.rename(final)
