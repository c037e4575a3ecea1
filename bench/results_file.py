"""The result files of the benchmarks: their head (title, command, machine), notes and raw numbers."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path


def machine_description(device: str) -> dict:
    import torch
    import transformers
    import vllm

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        have = set(next(l for l in text.splitlines() if l.startswith("flags")).split(":", 1)[1].split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have)
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def fmt(x: float, digits: int = 1) -> str:
    if x != x:  # nan
        return "-"
    return f"{x:.{digits}f}"


def report_head(title: str, machine: dict, log: list[str], elapsed: float) -> list[str]:
    """The first lines of a result file: title, the exact command, the machine."""
    return [
        f"# {title} ({machine['date']})",
        "",
        f"Command: `{' '.join(['python'] + sys.argv)}` (total {elapsed / 60:.1f} min)",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        *[f"- {line}" for line in log],
        "",
    ]


def notes_section(runs) -> list[str]:
    """The notes the runs collected (retries, low CPU share), one line per run that has any."""
    noted = [r for r in runs if r.notes]
    if not noted:
        return []
    return ["## Notes on runs", "", *[f"- {r.method}, {r.rows} rows, {r.context} ctx: {'; '.join(r.notes)}"
                                      for r in noted], ""]


def write_result_file(path: Path, lines: list[str], raw: dict) -> None:
    """Append the raw numbers as JSON and write the result file."""
    lines = lines + ["## Raw numbers", "", "```json", json.dumps(raw, indent=1), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
