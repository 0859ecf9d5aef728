"""Model checkpoints from a local path, an s3:// or an hf:// URI, as checked local paths.

An s3:// file or folder is downloaded once per node into a cache folder (default
~/.cache/sparsevar/checkpoints, or SPARSEVAR_CHECKPOINT_CACHE): under a file lock, so the actors of a node
share one download, into a temporary name that is renamed only once complete and checked. A file is checked
against its expected size and sha256 when given (and an s3 file against its object size always); the result
of a sha256 check is remembered per file, size and modification time, so a node hashes a large file once.
An hf:// file or folder (storage.hf) goes into huggingface_hub's own cache, under the same per-node lock.
Any problem raises CheckpointError naming the file and what was expected, before a model is built.

Storage knows no model: `localize_checkpoints` works on any config whose `checkpoints()` returns
{field: (uri, sha256, size)} and returns a copy with those fields set to local paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from storage import hf
from storage.s3 import TRANSFER, client, split_uri

DEFAULT_CACHE = "~/.cache/sparsevar/checkpoints"
_CHUNK = 16 * 1024 * 1024
FINGERPRINT_WHOLE = 64 * 1024 * 1024  # files up to this size are hashed whole; larger ones by their ends
FINGERPRINT_END = 1024 * 1024
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or not the expected file."""


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(os.path.expanduser(cache_dir or os.environ.get("SPARSEVAR_CHECKPOINT_CACHE") or DEFAULT_CACHE))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(paths: list[str]) -> str | None:
    """A short sha256 that tells weight files apart, for each metadata row's provenance (None: no files, as for
    random weights). It covers each file's name (within its folder), size and content: whole up to 64 MiB, else its
    first and last MiB, so a multi-GB checkpoint costs 2 MiB of reading, and the same files give the same value on
    every node (modification times, which differ between downloads, are left out)."""
    if not paths:
        return None
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            size = path.stat().st_size
            name = path.relative_to(root).as_posix() if root.is_dir() else path.name
            digest.update(f"{name}\0{size}\0".encode())
            with open(path, "rb") as f:
                if size <= FINGERPRINT_WHOLE:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                else:
                    digest.update(f.read(FINGERPRINT_END))
                    f.seek(size - FINGERPRINT_END)
                    digest.update(f.read(FINGERPRINT_END))
    return digest.hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on the node (a sibling `.lock` file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_file(path: Path, label: str, sha256: str | None, size: int | None, cache: Path) -> None:
    """Size, then sha256 (remembered in the cache per path, size and mtime) when expected."""
    found = path.stat().st_size
    if size is not None and found != size:
        raise CheckpointError(f"checkpoint {label} has {found} bytes, expected {size}"
                              f"{' (truncated or incomplete download?)' if found < size else ''}")
    if sha256 is None:
        return
    stat = path.stat()
    record = cache / "verified" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest() + ".json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256.lower()}
    if record.is_file() and json.loads(record.read_text()) == key:
        return
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise CheckpointError(f"checkpoint {label} has sha256 {actual}, expected {sha256.lower()} (wrong or "
                              f"corrupted file)")
    with suppress(OSError):  # a read-only cache only costs a re-hash next time
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(key))


def _local(uri: str) -> Path:
    return Path(os.path.expanduser(uri.removeprefix("file://")))


def _download(bucket: str, key: str, dest: Path, expected_size: int, label: str, endpoint_url: str | None) -> None:
    """Download to a temporary sibling and rename it into place once its size is the object's."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    client(endpoint_url).download_file(bucket, key, str(tmp), Config=TRANSFER)
    if tmp.stat().st_size != expected_size:
        raise CheckpointError(f"download of {label} stopped at {tmp.stat().st_size} of {expected_size} bytes")
    os.replace(tmp, dest)


def _objects(bucket: str, prefix: str, endpoint_url: str | None) -> dict[str, int]:
    """Keys under a folder prefix and their sizes."""
    pages = client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    try:
        return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
    except Exception as exc:  # noqa: BLE001 - botocore raises many types (credentials, network, access)
        raise CheckpointError(f"cannot list s3://{bucket}/{prefix}: {type(exc).__name__}: {exc}") from exc


def _fetch_s3(uri: str, sha256: str | None, size: int | None, cache: Path, endpoint_url: str | None) -> Path:
    bucket, key = split_uri(uri.rstrip("/"))
    dest = cache / "s3" / bucket / key
    done = dest.with_name(dest.name + ".complete")
    with _locked(dest):
        if done.is_file():
            if dest.is_file():
                _check_file(dest, uri, sha256, size, cache)
            return dest
        objects = _objects(bucket, key, endpoint_url)
        if key in objects:  # a file
            _download(bucket, key, dest, objects[key], uri, endpoint_url)
            try:
                _check_file(dest, uri, sha256, size, cache)
            except CheckpointError:
                dest.unlink()  # not the expected file: download again next time
                raise
        else:  # a folder: every object under key/
            files = {k: n for k, n in objects.items() if k.startswith(key + "/")}
            if not files:
                raise CheckpointError(f"checkpoint {uri} not found: no such object or folder in bucket {bucket}")
            if sha256 is not None or size is not None:
                raise CheckpointError(f"checkpoint {uri} is a folder; sha256 and size apply to files only")
            for object_key, object_size in files.items():
                _download(bucket, object_key, dest / object_key[len(key) + 1 :], object_size,
                          f"s3://{bucket}/{object_key}", endpoint_url)
        done.write_text(uri)
    return dest


def _fetch_hf(uri: str, sha256: str | None, size: int | None, cache: Path) -> Path:
    """Under a per-repo node lock, so that the actors of a node starting together make one download."""
    try:
        where = hf.parse(uri)
        with _locked(cache / "hf" / where.repo_id):
            path = hf.download(uri)
    except hf.HubError as exc:
        raise CheckpointError(str(exc)) from None
    if path.is_file():
        _check_file(path, uri, sha256, size, cache)
    elif sha256 is not None or size is not None:
        raise CheckpointError(f"checkpoint {uri} is a folder; sha256 and size apply to files only")
    return path


def fetch_checkpoint(uri: str, sha256: str | None = None, size: int | None = None, cache_dir: str | None = None,
                     endpoint_url: str | None = None) -> str:
    """The checked local path of a checkpoint file or folder given as a local path, file://, s3:// or hf:// URI
    (`endpoint_url` is S3's; the Hub's is HF_ENDPOINT)."""
    cache = cache_root(cache_dir)
    if uri.startswith("s3://"):
        return str(_fetch_s3(uri, sha256, size, cache, endpoint_url))
    if uri.startswith(hf.SCHEME):
        return str(_fetch_hf(uri, sha256, size, cache))
    if "://" in uri and not uri.startswith("file://"):
        raise CheckpointError(f"checkpoint {uri}: unsupported location; use a local path, an s3:// or an hf:// URI")
    path = _local(uri).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {uri} not found (looked for {path}): put the official file there, or "
                              "point the config's model section at it (a path, an s3:// or an hf:// URI); the README's "
                              "model sections list the files")
    if path.is_file():
        _check_file(path, uri, sha256, size, cache)
    elif sha256 is not None or size is not None:
        raise CheckpointError(f"checkpoint {uri} is a folder; sha256 and size apply to files only")
    return str(path)


def localize_checkpoints(model_cfg: T, cache_dir: str | None = None, endpoint_url: str | None = None) -> T:
    """A copy of a model config with its checkpoint fields as checked local paths (unchanged if it has none)."""
    specs: dict[str, tuple[str, str | None, int | None]] | None = getattr(model_cfg, "checkpoints", lambda: None)()
    if not specs:
        return model_cfg
    updates: dict[str, Any] = {field: fetch_checkpoint(uri, sha, size, cache_dir, endpoint_url)
                               for field, (uri, sha, size) in specs.items()}
    return model_cfg.model_copy(update=updates)  # type: ignore[attr-defined]
