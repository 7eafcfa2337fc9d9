"""The contracts shared at run time by `consumers/` and `service/` (which never import each other):
the Redis weight store, the Redis feature store, the Kafka wire format, and common settings."""
