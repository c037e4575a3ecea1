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
    final = cache / name
    if final.exists():
        print(f"alignd: {final} exists, kept")
        return final
    for stale in cache.glob(f".{name}.*"):
        if not stale.name.endswith(".work"):
            shutil.rmtree(stale, ignore_errors=True)
    print(f"alignd: building {name}", flush=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        make(tmp)
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    times[name] = time.perf_counter() - t0
    print(f"alignd: {name} built in {times[name]:.0f} s", flush=True)
    return final


def publish(tmp: Path, final: Path) -> None:
    # mkdtemp (and the safetensors writer) leave owner-only modes; a cache is for reading.
    for dirpath, dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    tmp.rename(final)
