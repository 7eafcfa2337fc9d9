"""Settings common to every process, from FRESHREC_* environment variables, loaded once."""

from __future__ import annotations

import redis
import redis.asyncio
import redis.asyncio.retry
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.backoff import NoBackoff
from redis.retry import Retry


class CommonSettings(BaseSettings):
    """Where Kafka and Redis are and how things are named. Each process subclasses this."""

    model_config = SettingsConfigDict(env_prefix="FRESHREC_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field("freshrec", pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # Redis key prefix
    topic_interactions: str = "freshrec.interactions"
    topic_items: str = "freshrec.items"
    topic_dlq: str = "freshrec.dlq"
    partitions: int = 4  # used when freshrec creates the topics itself
    hmac_key: SecretStr = SecretStr("")  # signs and verifies published weights; never in Redis
    redis_timeout_s: float = 5.0  # connect / read timeout of every Redis call: a hung Redis
    # (paused, partitioned) raises after this long instead of blocking the process for good

    def redis_client(self) -> redis.Redis:
        """A Redis client whose calls time out (see `redis_timeout_s`) and raise then.

        redis-py 8's default retry policy (10 retries with backoff, on connection errors and
        timeouts) is replaced: a timeout is not retried here, the caller decides (the API
        serves the last known history, the consumers retry their whole step); a dropped
        connection is retried once, at once. (Measured on redis-py 8.1: a read timeout was
        not retried even by the default; `tests/test_redis_timeouts.py` holds either way.)"""
        return redis.Redis.from_url(
            self.redis_url, socket_timeout=self.redis_timeout_s,
            socket_connect_timeout=self.redis_timeout_s, health_check_interval=30,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)))

    def redis_async_client(self) -> redis.asyncio.Redis:
        """`redis_client`'s twin for code on an event loop (the API's request path): the same
        timeouts and retry policy; its calls raise the same `redis.exceptions`."""
        return redis.asyncio.Redis.from_url(
            self.redis_url, socket_timeout=self.redis_timeout_s,
            socket_connect_timeout=self.redis_timeout_s, health_check_interval=30,
            retry=redis.asyncio.retry.Retry(
                NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)))

    def require_hmac_key(self) -> bytes:
        """Fail fast with a sentence a person understands when the signing key is missing."""
        key = self.hmac_key.get_secret_value().encode()
        if len(key) < 16:
            raise ValueError("FRESHREC_HMAC_KEY must be set to a secret of at least 16 characters "
                             "(it signs and verifies published model versions)")
        return key
