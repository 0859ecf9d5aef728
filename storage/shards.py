"""WebDataset tar shards: ``{output}/shards/images-000042.tar``, each sample ``KEY.png`` + ``KEY.json`` + ``KEY.txt``.

A shard is built whole and published atomically: on local disk in a hidden temp file beside its final name, then
renamed; for S3 in a local temp file, then uploaded as one object (multipart when large), which appears only once
complete. Readers, and a resumed run, so see a shard complete or not at all. Entries carry fixed times and
owners, so equal samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import tarfile
import tempfile
import uuid
from contextlib import suppress

from pyarrow import fs

from storage.s3 import put_file
from storage.uris import join, resolve

SHARD_DIR = "shards"
SHARD_NAME = "images"
CONTENT_TYPE = "application/x-tar"
MAX_KEY_ID = 64  # keeps KEY.json under tar's 100-character names with any 64-bit seed
TEMP_SUFFIX = ".tmp"

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{6,}\.tar$")


def shard_name(index: int, name: str = SHARD_NAME) -> str:
    """``images-000042.tar``: the shard's index, zero-padded to 6 digits so names sort in index order."""
    return f"{name}-{index:06d}.tar"


def sample_key(prompt_id: str, seed: int) -> str:
    """The sample's key inside its shard, from (id, seed) as the `files` layout names images.

    WebDataset readers split a member name at its first dot into key and extension, so the key holds no dots
    (and no slashes); an id that had to change, or was too long, gets a hash of the original appended, so ids
    that clean up alike (``a.b`` and ``a_b``) keep distinct keys.
    """
    cleaned = _UNSAFE_KEY_CHARS.sub("_", prompt_id)
    if cleaned != prompt_id or not cleaned or len(cleaned) > MAX_KEY_ID:
        digest = hashlib.sha256(prompt_id.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_KEY_ID - len(digest) - 1]}-{digest}"
    return f"{cleaned}-s{seed}"


def member_uri(shard_uri: str, key: str, extension: str) -> str:
    """``.../shards/images-000003.tar#KEY.png``: one image inside its shard, for the metadata's image_uri."""
    return f"{shard_uri}#{key}.{extension}"


def shard_of(uri: str) -> str:
    """The shard file name in a `shard` or member URI (``images-000003.tar``)."""
    return posixpath.basename(uri.partition("#")[0])


def shard_folder(output_uri: str, endpoint_url: str | None = None) -> tuple[fs.FileSystem, str, str]:
    """The filesystem, its path of ``{output}/shards`` and the URI recorded in metadata (absolute when local)."""
    filesystem, root = resolve(output_uri, endpoint_url)
    local = isinstance(filesystem, fs.LocalFileSystem)
    return filesystem, join(root, SHARD_DIR), join(root if local else output_uri, SHARD_DIR)


def list_shards(output_uri: str, endpoint_url: str | None = None) -> set[str]:
    """Names of the published shards (temp files and anything else in the folder left out)."""
    filesystem, folder, _ = shard_folder(output_uri, endpoint_url)
    infos = filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
    return {i.base_name for i in infos if i.type == fs.FileType.File and _SHARD_FILE.match(i.base_name)}


def remove_temp_files(output_uri: str, endpoint_url: str | None = None) -> int:
    """Delete the hidden temp files that writers killed mid-shard left in a local shards folder; call it only
    while no job writes to the output. Object stores hold no temp files (theirs are on the workers)."""
    filesystem, folder, _ = shard_folder(output_uri, endpoint_url)
    if not isinstance(filesystem, fs.LocalFileSystem):
        return 0
    removed = 0
    for info in filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True)):
        if info.type == fs.FileType.File and info.base_name.startswith(".") and info.base_name.endswith(TEMP_SUFFIX):
            with suppress(FileNotFoundError):
                os.unlink(info.path)
                removed += 1
    return removed


class ShardWriter:
    """Builds one shard sample by sample, then publishes it whole (``publish``) or leaves nothing (``discard``).

    Usable as a context manager: leaving the block without publishing discards the shard.
    """

    def __init__(self, output_uri: str, index: int, endpoint_url: str | None = None, name: str = SHARD_NAME) -> None:
        filesystem, folder, uri_folder = shard_folder(output_uri, endpoint_url)
        self.name = shard_name(index, name)
        self.uri = join(uri_folder, self.name)
        self.endpoint_url = endpoint_url
        self.error: str | None = None  # set once a write failed: the shard is then incomplete and never published
        self.samples = 0
        self._local = isinstance(filesystem, fs.LocalFileSystem)
        if self._local:
            os.makedirs(folder, exist_ok=True)
            self._temp = os.path.join(folder, f".{self.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
            self._file = open(self._temp, "xb")  # closed by publish or discard
        else:
            self._file = tempfile.NamedTemporaryFile(prefix=f".{self.name}.", suffix=TEMP_SUFFIX, delete=False)
            self._temp = self._file.name
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._done = False

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: ``members`` maps extensions (``png``, ``json``, ``txt``) to bytes, in that order."""
        if self.error is not None:
            raise RuntimeError(f"shard {self.name} is incomplete after an earlier failure: {self.error}")
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty and hold no dots or slashes")
        try:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                self._tar.addfile(info, io.BytesIO(data))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        self.samples += 1

    def publish(self) -> None:
        """Close the tar and put it under its final name in one step."""
        if self.error is not None:
            raise RuntimeError(f"shard {self.name} is incomplete after an earlier failure: {self.error}")
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self._local:
                os.replace(self._temp, self.uri)
            else:
                put_file(self.uri, self._temp, CONTENT_TYPE, self.endpoint_url)
                os.unlink(self._temp)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.discard()
            raise
        self._done = True

    def discard(self) -> None:
        """Drop the unpublished shard and its temp file."""
        if self._done:
            return
        self._done = True
        with suppress(Exception):
            self._tar.close()
        with suppress(Exception):
            self._file.close()
        with suppress(FileNotFoundError):
            os.unlink(self._temp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


def read_stored_images(uris: list[str], endpoint_url: str | None = None) -> dict[str, bytes]:
    """The stored bytes of each image URI, a file or a shard member (``{shard}#{KEY}.{ext}``); each shard is read
    once, whatever the number of its members asked for."""
    found: dict[str, bytes] = {}
    members: dict[str, list[str]] = {}
    for uri in uris:
        shard, sep, _ = uri.partition("#")
        if sep and shard.endswith(".tar"):
            members.setdefault(shard, []).append(uri)
            continue
        filesystem, path = resolve(uri, endpoint_url)
        with filesystem.open_input_stream(path) as stream:
            found[uri] = stream.read()
    for shard, wanted in members.items():
        filesystem, path = resolve(shard, endpoint_url)
        with filesystem.open_input_file(path) as stream, tarfile.open(fileobj=stream) as tar:
            for uri in wanted:
                member = tar.extractfile(uri.partition("#")[2])
                if member is None:
                    raise FileNotFoundError(f"{uri}: no such member in its shard")
                found[uri] = member.read()
    return found
