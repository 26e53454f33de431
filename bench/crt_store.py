"""An S3Store whose chunk GETs go through awscrt (AWS's C runtime S3 client) instead of snapscale's
own `shared/store/httpget.py`, for bench/prefetch.py to run the two side by side.

Everything but the GET is the store's: its semaphore, throttle, retries and error classes, and the
Prefetcher around it (its buffers, SHA-256 of every chunk, the host cache). The CRT signs each
request itself (SigV4 in C, credentials from the environment), keeps its own connections on its
own threads, and hands the body over piece by piece (`on_body`); each piece is copied into the
Prefetcher's buffer at its offset. httpget has the kernel write the body into that buffer
directly, and signs by a presigned URL from botocore.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import quote, urlsplit

from awscrt import auth, http, io, s3

from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.store import httpget
from snapscale.shared.store.backend import TooBigError
from snapscale.shared.store.s3 import S3Store


class CrtGetter:
    """One awscrt S3 client: GETs of whole objects, each body written into the caller's buffer."""

    def __init__(self, endpoint: str, region: str, connections: int, part_bytes: int) -> None:
        u = urlsplit(endpoint)
        self.host = u.netloc
        tls = s3.S3RequestTlsMode.ENABLED if u.scheme == "https" else s3.S3RequestTlsMode.DISABLED
        elg = io.EventLoopGroup(min(4, os.cpu_count() or 1))
        bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
        creds = auth.AwsCredentialsProvider.new_environment()
        self.client = s3.S3Client(
            bootstrap=bootstrap,
            region=region,
            tls_mode=tls,
            signing_config=s3.create_default_s3_signing_config(region=region, credential_provider=creds),
            # One GET a chunk, as httpget does: a part as large as the largest chunk.
            part_size=part_bytes,
            max_active_connections_override=connections,
        )

    async def get_into(self, bucket: str, key: str, buf: memoryview) -> int:
        got = 0

        def on_body(chunk: Any, offset: int, **_kw: Any) -> None:
            nonlocal got
            end = offset + len(chunk)
            if end > len(buf):
                raise TooBigError(f"{key}: more than the {len(buf)} bytes expected")  # the CRT cancels
            buf[offset:end] = chunk
            got += len(chunk)

        req = http.HttpRequest("GET", f"/{bucket}/{quote(key)}", http.HttpHeaders([("Host", self.host)]))
        r = self.client.make_request(type=s3.S3RequestType.GET_OBJECT, request=req, on_body=on_body)
        try:
            await asyncio.wrap_future(r.finished_future)
        except s3.S3ResponseError as e:
            # The store's own error class, so its retries and not-found handling apply unchanged.
            raise httpget.s3_error(e.status_code, e.body or b"") from None
        except TooBigError:
            raise
        except Exception as e:  # the CRT's connection errors: retryable, like a dropped connection
            raise ConnectionError(f"awscrt GET {key}: {e}") from e
        return got


class CrtS3Store(S3Store):
    """S3Store with chunk GETs by awscrt; everything else (manifests, uploads) through aioboto3."""

    crt: CrtGetter

    async def get_into(self, key: str, buf: memoryview) -> int:
        crt = self.crt
        return await self._call("get", key, lambda: crt.get_into(self.bucket, self._key(key), buf))


@asynccontextmanager
async def open_crt_store(settings: StoreSettings, part_bytes: int) -> AsyncIterator[CrtS3Store]:
    """`open_store` for the bench's awscrt variant: same settings, an S3 endpoint URL given."""
    if not settings.endpoint_url:
        raise ValueError("the awscrt variant needs the endpoint's URL (the bench's moto or relay)")
    st = cast(CrtS3Store, await CrtS3Store.open(settings))  # `open` builds `cls`
    st.crt = CrtGetter(settings.endpoint_url, settings.region, settings.max_concurrency, part_bytes)
    try:
        yield st
    finally:
        await st.close()
