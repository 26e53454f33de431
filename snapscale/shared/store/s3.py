"""The S3 chunk store through aioboto3: one long-lived client whose connection pool matches the
allowed concurrency, a semaphore plus a request-rate throttle, and our own retries with backoff.

Every response body is read or closed before the connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from asyncio_throttle.throttler import Throttler
from botocore import exceptions as bex

from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.store import httpget
from snapscale.shared.store.backend import (
    ChunkStore,
    NotFoundError,
    ObjectInfo,
    RetryableStoreError,
    StoreError,
    TooBigError,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}  # fmt: skip
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# A request signed for the wrong region: aioboto3 follows these to the right one.
_REGION_CODES = {"AuthorizationQueryParametersError", "AuthorizationHeaderMalformed", "PermanentRedirect"}
_TRANSIENT = (
    bex.EndpointConnectionError,
    bex.ConnectionClosedError,
    bex.ConnectTimeoutError,
    bex.ReadTimeoutError,
    bex.IncompleteReadError,
    bex.ResponseStreamingError,
    bex.HTTPClientError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_delay_s: float = 0.05
    max_delay_s: float = 4.0

    def delay_s(self, attempt: int) -> float:
        """Exponential backoff with equal jitter for retry number `attempt` (1-based): spread out,
        yet never so short that a burst of retries lands inside the same outage."""
        d = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return d / 2 + random.uniform(0, d / 2)


def classify(e: BaseException) -> str:
    """'not_found', 'retry' or 'fatal' for an exception raised by a client call."""
    if isinstance(e, bex.ClientError):
        err = e.response.get("Error", {})
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return _classify_status(status, str(err.get("Code", "")))
    if isinstance(e, httpget.HttpStatusError):
        return _classify_status(e.status, e.code)
    if isinstance(e, _TRANSIENT):
        return "retry"
    return "fatal"


def _classify_status(status: int, code: str) -> str:
    if code in _NOT_FOUND_CODES or status == 404:
        return "not_found"
    if code in _RETRY_CODES or status >= 500 or status == 429:
        return "retry"
    return "fatal"


def proxied(url: str) -> bool:
    """The environment sends `url` through an HTTP proxy (HTTP(S)_PROXY, less NO_PROXY)."""
    u = urllib.parse.urlsplit(url)
    return u.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(u.netloc)


class S3Store(ChunkStore):
    def __init__(
        self, client: S3Client, stack: AsyncExitStack, settings: StoreSettings, retry: RetryPolicy
    ) -> None:
        self._client = client
        self._stack = stack
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.retry = retry
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        self._throttle = Throttler(rate_limit=max(1, int(settings.max_requests_per_s)), period=1.0)
        self.description = settings.url + (f" at {settings.endpoint_url}" if settings.endpoint_url else "")
        self.retries = 0  # retried calls, for reports and tests
        # Chunk GETs read straight into the caller's buffer (see httpget); None: through aioboto3.
        self._direct: httpget.HttpGetter | None = None
        if settings.direct_get:
            self._direct = httpget.HttpGetter(max_idle=settings.max_concurrency)

    @classmethod
    async def open(cls, settings: StoreSettings, retry: RetryPolicy | None = None) -> S3Store:
        cfg = AioConfig(
            max_pool_connections=settings.max_concurrency,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves, with our backoff
            connect_timeout=10,
            read_timeout=60,
            # Chunks are verified against their SHA-256 by the caller; CRC32 on top only costs CPU.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = AsyncExitStack()
        session = aioboto3.Session()
        client = await stack.enter_async_context(
            session.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=cfg)
        )
        store = cls(client, stack, settings, retry or RetryPolicy())
        if store._direct is not None:
            # Once, not a GET each: the environment is read once, and every chunk URL has this host.
            url = await client.generate_presigned_url(
                "get_object", Params={"Bucket": store.bucket, "Key": store._key("chunks")}, ExpiresIn=60
            )
            if proxied(url):
                host = urllib.parse.urlsplit(url).netloc
                store._direct_off(f"an HTTP proxy is set for {host} (not in NO_PROXY)")
        return store

    def _direct_off(self, why: object) -> None:
        """Chunk GETs through aioboto3 from now on (said once, however many GETs found out)."""
        if self._direct is None:
            return
        log.warning("S3 direct GETs off for %s (%s); chunks go through aioboto3", self.description, why)
        self._direct.close()
        self._direct = None

    async def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        await self._stack.aclose()

    @property
    def direct_stats(self) -> httpget.GetterStats | None:
        """Connections and requests of the direct chunk GETs; None while they are off."""
        return self._direct.stats if self._direct is not None else None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, what: str, key: str, op: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._sem, self._throttle:
                    return await op()
            except Exception as e:
                # Ours, raised inside `op`: already says what is wrong, or asks for another path.
                if isinstance(e, (StoreError, httpget.UnsupportedResponse)):
                    raise
                kind = classify(e)
                if kind == "not_found":
                    raise NotFoundError(key) from None
                if kind == "fatal":
                    raise StoreError(f"S3 {what} {key}: {e}") from e
                if attempt >= self.retry.attempts:
                    raise RetryableStoreError(
                        f"S3 {what} {key}: still failing after {attempt} tries: {e}"
                    ) from e
                delay = self.retry.delay_s(attempt)
                self.retries += 1
                log.warning("S3 %s %s failed (%s), try %d in %.2fs", what, key, e, attempt + 1, delay)
                await asyncio.sleep(delay)

    async def put(self, key: str, data: bytes) -> None:
        async def op() -> None:
            await self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

        await self._call("put", key, op)

    async def get(self, key: str) -> bytes:
        async def op() -> bytes:
            resp = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            # Reading inside the context returns the connection to the pool even if reading fails.
            async with resp["Body"] as body:
                data = await body.read()
            want = resp.get("ContentLength")
            if want is not None and len(data) != want:
                raise bex.IncompleteReadError(actual_bytes=len(data), expected_bytes=want)
            return data

        return await self._call("get", key, op)

    async def get_into(self, key: str, buf: memoryview) -> int:
        """The body read into `buf`: by `httpget` through a presigned URL (the kernel writes it
        into `buf`, no other copy), or else block by block from aioboto3's stream. Either way no
        allocation the size of the object (`get` + `bytes.join` needs one a call)."""
        getter = self._direct
        if getter is not None:
            try:
                return await self._call("get", key, lambda: self._direct_get(getter, key, buf))
            except httpget.UnsupportedResponse as e:
                # Not retried, not fatal: this client cannot read what the server sends, aioboto3 can.
                self._direct_off(e)

        async def op() -> int:
            resp = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            want = resp.get("ContentLength")
            async with resp["Body"] as body:
                if want is not None and want > len(buf):
                    raise TooBigError(f"{key}: {want} bytes, more than the {len(buf)} expected")
                content = body.content  # the aiohttp StreamReader behind aiobotocore's body
                pos = 0
                while True:
                    block, _ = await content.readchunk()  # a block as received, not a copy
                    if not block:
                        break
                    end = pos + len(block)
                    if end > len(buf):
                        raise TooBigError(f"{key}: more than the {len(buf)} bytes expected")
                    buf[pos:end] = block
                    pos = end
            if want is not None and pos != want:
                raise bex.IncompleteReadError(actual_bytes=pos, expected_bytes=want)
            return pos

        return await self._call("get", key, op)

    async def _direct_get(self, getter: httpget.HttpGetter, key: str, buf: memoryview) -> int:
        url = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=900
        )
        try:
            return await getter.get_into(url, buf)
        except httpget.BodyTooBig as e:
            raise TooBigError(f"{key}: {e}") from None
        except httpget.HttpStatusError as e:
            if e.code in _REGION_CODES:  # botocore's redirector finds the bucket's region; we do not
                raise httpget.UnsupportedResponse(f"{e} (the bucket is in another region?)") from e
            raise

    async def touch(self, key: str) -> bool:
        k = self._key(key)

        async def op() -> None:
            # A copy onto itself with new metadata is how S3 refreshes LastModified.
            await self._client.copy_object(
                Bucket=self.bucket,
                Key=k,
                CopySource={"Bucket": self.bucket, "Key": k},
                MetadataDirective="REPLACE",
                Metadata={"touched": f"{time.time():.3f}"},
            )

        try:
            await self._call("touch", key, op)
        except NotFoundError:
            return False
        return True

    async def iter_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        full = self._key(prefix)
        strip = len(self._key(""))
        token: str | None = None
        while True:
            kw: dict[str, str] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token

            async def op(kw: dict[str, str] = kw) -> dict[str, object]:
                return dict(await self._client.list_objects_v2(**kw))  # type: ignore[arg-type]

            page = await self._call("list", prefix, op)
            for o in page.get("Contents", []) or []:  # type: ignore[attr-defined]
                yield ObjectInfo(o["Key"][strip:], int(o["Size"]), o["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = str(page["NextContinuationToken"])

    async def delete(self, key: str) -> None:
        async def op() -> None:
            await self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

        await self._call("delete", key, op)
