"""``tieredcache stats URL``: hit rates from a running service's Prometheus endpoint.

$ tieredcache stats http://127.0.0.1:9108/metrics --by tenant
namespace  layer   tenant  hits    misses  stale  hit rate
shop       memory  acme    91,204  8,811   0      91.2%
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .errors import MissingExtraError

GROUPS = ("layer", "function", "tenant")


def fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def aggregate(text: str, by: str) -> list[dict[str, Any]]:
    """Sum lookups per (namespace, layer[, by]) from Prometheus text."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError as exc:  # pragma: no cover
        raise MissingExtraError("metrics", "prometheus-client") from exc
    sums: dict[tuple[str, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    loader_calls: dict[tuple[str, ...], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "tieredcache_lookups_total":
                group: tuple[str, ...] = (labels["namespace"], labels["layer"])
                if by != "layer":
                    group = (*group, labels[by])
                sums[group][labels["result"]] += sample.value
            elif sample.name == "tieredcache_loader_events_total" and labels["event"] == "calls":
                owner: tuple[str, ...] = (labels["namespace"],)
                if by != "layer":
                    owner = (*owner, labels[by])
                loader_calls[owner] += sample.value
    rows = []
    for group, counts in sorted(sums.items()):
        hits, misses = counts.get("hit", 0.0), counts.get("miss", 0.0)
        row: dict[str, Any] = {"namespace": group[0], "layer": group[1]}
        if by != "layer":
            row[by] = group[2]
        row.update(
            hits=int(hits),
            misses=int(misses),
            stale=int(counts.get("stale", 0.0)),
            hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        )
        rows.append(row)
    for owner, calls in sorted(loader_calls.items()):
        row = {"namespace": owner[0], "layer": "(loader)", "calls": int(calls)}
        if by != "layer":
            row[by] = owner[1]
        rows.append(row)
    return rows


def render(rows: Sequence[dict[str, Any]], by: str) -> str:
    columns = ["namespace", "layer"] + ([by] if by != "layer" else [])
    columns += ["hits", "misses", "stale", "hit rate", "loader calls"]
    table = [columns]
    for row in rows:
        cells = [str(row.get(c, "")) for c in columns[: 3 if by != "layer" else 2]]
        if "calls" in row:
            cells += ["", "", "", "", f"{row['calls']:,}"]
        else:
            cells += [
                f"{row['hits']:,}",
                f"{row['misses']:,}",
                f"{row['stale']:,}",
                f"{row['hit_rate']:.1%}",
                "",
            ]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tieredcache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="print hit rates from a metrics endpoint")
    stats.add_argument(
        "url", help="the service's Prometheus endpoint, e.g. http://host:9108/metrics"
    )
    stats.add_argument(
        "--by", choices=GROUPS, default="layer", help="break down by (default: layer)"
    )
    stats.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    stats.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout in seconds")
    args = parser.parse_args(argv)
    try:
        text = fetch(args.url, args.timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"tieredcache: cannot read {args.url}: {exc}", file=sys.stderr)
        return 2
    rows = aggregate(text, args.by)
    if not rows:
        print(f"tieredcache: no tieredcache metrics at {args.url}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else render(rows, args.by))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
