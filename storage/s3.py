"""boto3 access to S3 and S3-compatible stores, configured only from the standard AWS settings.

Credentials come from boto3's own chain (environment, shared files, instance roles); this module never
reads, logs or returns them. The endpoint is `storage.endpoint_url` when given, else AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

# Uploads above 16 MiB go in parts, so a large image or shard survives a dropped connection part by part.
TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not bucket:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def new_client(endpoint_url: str | None = None):
    """A client with the credentials of this moment, adaptive retries for throttling and transient errors."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(retries={"max_attempts": 10, "mode": "adaptive"},
                    s3={"addressing_style": "path"} if endpoint else {})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


client = lru_cache(maxsize=8)(new_client)
client.__doc__ = "One client per endpoint and process (new_client's, cached), for the many writes of an actor."


def put_bytes(uri: str, data: bytes, content_type: str, endpoint_url: str | None = None) -> None:
    """Upload an object whole (multipart when large); it appears only once complete, so the write is atomic."""
    bucket, key = split_uri(uri)
    client(endpoint_url).upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs={"ContentType": content_type},
                                        Config=TRANSFER)


def put_file(uri: str, path: str, content_type: str, endpoint_url: str | None = None) -> None:
    """Upload a local file as one object (multipart when large); like put_bytes, it appears only once complete."""
    bucket, key = split_uri(uri)
    client(endpoint_url).upload_file(path, bucket, key, ExtraArgs={"ContentType": content_type}, Config=TRANSFER)
