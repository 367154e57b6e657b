"""The README's demo: PostgreSQL -> Debezium -> Kafka -> worker -> Redis and two apps.

Runs ``python -m examples.demo`` (what ``scripts/demo.sh`` runs after bootstrap)
in a subprocess: it starts a JVM, which JPype can start only once per process,
and this test session may already hold one (``tests/test_cdc_source.py``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_demo_chain_is_fresh_everywhere_with_zero_survivors() -> None:
    """Exit 0: both apps read every change fresh, nothing stale, the inspector finds none."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "inspector survivors: 0" in result.stdout, output
    assert "stale reads after the chain settled: 0" in result.stdout, output
    assert result.stdout.count("commit -> fresh read: app1") == 4, output
    assert "worker exit code after SIGTERM: 0" in result.stdout, output
    assert elapsed < 120, f"the demo took {elapsed:.0f} s:\n{output}"


@pytest.mark.slow
@pytest.mark.redis
def test_redis_only_demo_still_runs() -> None:
    """``--redis-only``: the two-replica demo without CDC, no stale read."""
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--redis-only", "--seconds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stale reads after" in result.stdout
