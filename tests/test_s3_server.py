"""The S3 fixture is a real HTTP server: aioboto3 puts, heads and gets an object through it."""

from __future__ import annotations

import aioboto3
import pytest
from botocore.exceptions import ClientError
from conftest import S3Server


async def test_put_head_get_through_aioboto3(s3_server: S3Server, namespace: str) -> None:
    session = aioboto3.Session()
    key = f"{namespace}/hello"
    async with session.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1") as s3:
        await s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"x" * 1000)
        head = await s3.head_object(Bucket=s3_server.bucket, Key=key)
        assert head["ContentLength"] == 1000
        got = await s3.get_object(Bucket=s3_server.bucket, Key=key)
        async with got["Body"] as body:
            assert await body.read() == b"x" * 1000
        with pytest.raises(ClientError) as ei:
            await s3.head_object(Bucket=s3_server.bucket, Key=f"{namespace}/absent")
        assert ei.value.response["Error"]["Code"] == "404"
