"""A short run of bench/load.py against a real server: every decoder, streams and not, a fifth
of the clients going away early. Nothing may fail with a 5xx, and once the load stops the server
must hold nothing: no request, sequence, guide budget or guide cache of any of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent


def test_short_load_run_fails_nothing_and_leaks_nothing(hostile_server, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--url", hostile_server.url,
         "--server-pid", str(hostile_server.proc.pid), "--rewards", "a,b", "--values", "va",
         "--clients", "12", "--max-tokens", "12", "--warmup-seconds", "10", "--plain-seconds", "30",
         "--mixed-seconds", "75", "--json", str(out)],
        env={**os.environ, "ALIGND_API_KEY": API_KEY}, capture_output=True, text=True, timeout=600,
    )
    print(run.stdout[-5000:])
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["server_errors"] == 0
    assert result["held"] == {k: 0.0 for k in result["held"]}
    mixed = result["phases"]["mixed"]
    assert set(mixed) == {"plain", "args", "transfer_q", "best_of_n", "vas", "dera"}
    assert all(row["completed"] > 0 for row in mixed.values()), mixed
    assert sum(row["went_away"] for row in mixed.values()) > 0
    assert result["rss_start"] and result["rss_end"]
