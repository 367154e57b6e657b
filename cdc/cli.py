"""``tieredcache-cdc``: check the configuration, run the worker, run the inspector.

    tieredcache-cdc check   --config cdc.toml   # exit 1 with one line per problem
    tieredcache-cdc run     --config cdc.toml   # a consumer-group member; SIGTERM to leave
    tieredcache-cdc inspect --config cdc.toml   # the coherence inspector

``python -m cdc`` is the same. ``run`` does the checks first and refuses to start
on any problem (``--skip-check`` to override, e.g. without database access).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from cdc.config import CdcConfig, build_caches, load_config
from tieredcache.errors import TieredCacheError

if TYPE_CHECKING:
    from tieredcache import TieredCache

__all__ = ["check", "main"]

log = logging.getLogger("cdc")


def check(
    config: CdcConfig, caches: Sequence[TieredCache], *, kafka_timeout: float = 5.0
) -> list[str]:
    """Every problem with the rules, the database, the caches' settings and Kafka."""
    problems: list[str] = []
    if config.rules.dsn:
        from cdc.inspect import validate_rules_against_db

        try:
            problems += validate_rules_against_db(config.rules.dsn, config.rules)
        except Exception as exc:  # psycopg.Error and friends: report, do not crash
            problems.append(
                f"database: cannot check the rules against {_safe(config.rules.dsn)}: {exc}"
            )
    else:
        problems.append("database: [cdc] dsn is not set, so the rules were not checked against it")
    for cache in caches:
        try:
            problems += [f"cache {cache.namespace!r}: {p}" for p in cache.check_settings()]
        except TieredCacheError as exc:
            problems.append(f"cache {cache.namespace!r}: {exc}")
    problems += _check_kafka(config, kafka_timeout)
    return problems


def _safe(dsn: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return dsn if parts.password is None else dsn.replace(parts.password, "***")


def _check_kafka(config: CdcConfig, timeout: float) -> list[str]:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    settings = config.worker
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return [f"kafka: cannot reach {settings.bootstrap_servers}: {exc}"]
    problems = []
    for topic in settings.topics:
        if not topic.startswith("^") and topic not in metadata.topics:
            problems.append(
                f"kafka: topic {topic!r} does not exist (yet) on {settings.bootstrap_servers}"
            )
    return problems


def _run(config: CdcConfig, args: argparse.Namespace) -> int:
    from cdc.health import HealthServer, WorkerStatus
    from cdc.metrics import WorkerMetrics
    from cdc.worker import DeadLetterError, Worker

    caches = build_caches(config)
    try:
        if not args.skip_check:
            problems = check(config, caches)
            if problems:
                for problem in problems:
                    print(f"error: {problem}", file=sys.stderr)
                print("refusing to start (--skip-check to override)", file=sys.stderr)
                return 1
        status = WorkerStatus()
        metrics = WorkerMetrics()
        port = config.health_port if args.health_port is None else args.health_port
        health = HealthServer(status, metrics.registry, port=port).start()
        worker = Worker(config.worker, config.rules, caches, metrics=metrics, status=status)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: finishing the batch, committing, leaving the group", signum)
            worker.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print(
            f"tieredcache-cdc: consuming {list(config.worker.topics)} as group "
            f"{config.worker.group_id!r}; health on :{health.port}",
            file=sys.stderr,
            flush=True,
        )
        try:
            worker.run()
        except DeadLetterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            health.stop()
        return 0
    finally:
        for cache in caches:
            cache.close()


def _inspect(config: CdcConfig, args: argparse.Namespace) -> int:
    from cdc.inspector import run_inspector

    return run_inspector(config, health_port=args.health_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tieredcache-cdc", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("check", "validate rules, database, cache settings and Kafka"),
        ("run", "run a worker (a consumer-group member)"),
        ("inspect", "run the coherence inspector"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="the TOML file")
        cmd.add_argument("--log-level", default="INFO")
        if name != "check":
            cmd.add_argument("--health-port", type=int, default=None)
        if name == "run":
            cmd.add_argument("--skip-check", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        config = load_config(args.config)
    except TieredCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        caches = build_caches(config)
        try:
            problems = check(config, caches)
        finally:
            for cache in caches:
                cache.close()
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print("ok: rules, database, cache settings and Kafka agree")
        return 1 if problems else 0
    if args.command == "run":
        return _run(config, args)
    return _inspect(config, args)


if __name__ == "__main__":
    sys.exit(main())
