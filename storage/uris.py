"""Turn the user's output/input locations (local paths or s3:// URIs) into pyarrow filesystems."""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlsplit

from pyarrow import fs

SUPPORTED_FORMS = "a local path, file:///absolute/path or s3://bucket/key"


def resolve(uri: str, endpoint_url: str | None = None) -> tuple[fs.FileSystem, str]:
    """Return the filesystem holding ``uri`` and the path to use with it.

    Local paths come back absolute (with ``~`` expanded, as configs are not shell-expanded) so that
    workers with another working directory agree on them.
    S3 filesystems are built directly rather than through ``FileSystem.from_uri``, which would ask
    the network for the bucket's region; this keeps construction offline and honours a custom
    endpoint (MinIO, moto) given here or in ``AWS_ENDPOINT_URL``.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return fs.FileSystem.from_uri(os.path.abspath(os.path.expanduser(uri)))
    if scheme == "file":
        return fs.FileSystem.from_uri(uri)
    if scheme == "s3":
        if not rest.strip("/"):
            raise ValueError(f"{uri!r} names no bucket; use {SUPPORTED_FORMS}")
        return _s3_filesystem(endpoint_url or os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")
    raise ValueError(f"unsupported location {uri!r}: use {SUPPORTED_FORMS}")


def _s3_filesystem(endpoint_url: str | None) -> fs.S3FileSystem:
    """Build an S3 filesystem; pyarrow wants the endpoint's scheme and host passed separately."""
    options: dict[str, str] = {}
    if region := os.environ.get("AWS_REGION"):
        options["region"] = region
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        if parts.scheme:
            options["scheme"] = parts.scheme
            options["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        else:
            options["endpoint_override"] = endpoint_url
    return fs.S3FileSystem(**options)


def join(base: str, *parts: str) -> str:
    """Join a local path or URI with "/"-separated parts, never doubling or losing a separator."""
    scheme, sep, path = base.partition("://")
    if not sep:
        scheme, path = "", base
    pieces = [part.strip("/") for part in parts if part.strip("/")]
    head = path.rstrip("/") or path[:1]
    if not pieces:
        joined = head
    elif not head or head.endswith("/"):
        joined = head + "/".join(pieces)
    else:
        joined = head + "/" + "/".join(pieces)
    return f"{scheme}{sep}{joined}"


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> str:
    """Write one small file (a record, a page, a plot) to a local path or object store; returns the URI."""
    filesystem, path = resolve(uri, endpoint_url)
    if isinstance(filesystem, fs.LocalFileSystem):  # object stores have no folders to make
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)
    return uri
