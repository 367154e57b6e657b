"""The change-data-capture invalidator (Debezium events from Kafka); not built yet.

Its contract with the library is in place: it will map change events to tenant
keys and tags and call ``TieredCache.invalidate`` (which reaches every layer and,
through the ``{prefix}:inval:{namespace}`` channel, every replica), committing an
offset only when the returned ``InvalidationResult`` is ``ok``.
"""
