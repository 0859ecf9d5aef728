"""Encode generated pixels as image files and store them under the output root."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from contextlib import suppress
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image
from pyarrow import fs

from storage.s3 import put_bytes, put_file
from storage.uris import join, resolve

ImageFormat = Literal["png", "jpeg", "webp"]
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_NAME_LENGTH = 100
IMAGE_DIR = "images"
# Hugging Face `imagefolder` metadata: one JSON object a line, `file_name` relative to the file's own folder.
IMAGEFOLDER_METADATA = "metadata.jsonl"

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_LEADING_DOTS = re.compile(r"^\.+")


def safe_name(prompt_id: str) -> str:
    """Make a user-supplied id usable as a file and object name without letting it escape the folder.

    Changed ids get a hash of the original appended, so ids that clean up alike (``a/b`` and ``a_b``)
    still land in different files.
    """
    cleaned = _UNSAFE_CHARS.sub("_", prompt_id)
    cleaned = _LEADING_DOTS.sub(lambda dots: "_" * len(dots[0]), cleaned)
    if cleaned == prompt_id and 0 < len(cleaned) <= MAX_NAME_LENGTH:
        return cleaned
    digest = hashlib.sha256(prompt_id.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[: MAX_NAME_LENGTH - len(digest) - 1]}-{digest}"


def image_key(prompt_id: str, seed: int, fmt: ImageFormat) -> str:
    """Name the image by (id, seed) only, so a retried or resumed run overwrites rather than duplicates."""
    return f"{IMAGE_DIR}/{safe_name(prompt_id)}-s{seed}.{EXTENSIONS[fmt]}"


def _check_options(fmt: str, quality: int) -> None:
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; use one of {sorted(_PIL_FORMATS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"image quality must be between 1 and 100, got {quality}")


def encode_image(pixels_HWC: np.ndarray, fmt: ImageFormat, quality: int = 95) -> bytes:
    """Encode uint8 RGB pixels; no metadata is written, so equal pixels give byte-identical files."""
    _check_options(fmt, quality)
    pixels = np.asarray(pixels_HWC)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got dtype {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ValueError(f"expected a non-empty HxWx3 RGB array, got shape {pixels.shape}")
    buffer = io.BytesIO()
    options = {} if fmt == "png" else {"quality": quality}
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def _write_local_atomically(path: str, chunks: Iterable[bytes]) -> None:
    """Write `chunks` via a hidden temp file and rename, so readers never see a partial file under its name."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp_path, "xb") as file:
            file.writelines(chunks)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


class StoredImage(NamedTuple):
    uri: str
    sha256: str
    size: int  # bytes: a resumed run compares it with the file's, to find an image damaged on disk


class ImageWriter:
    """Stores encoded images under ``{output_uri}/images/`` on local disk or S3."""

    def __init__(
        self,
        output_uri: str,
        fmt: ImageFormat = "png",
        quality: int = 95,
        endpoint_url: str | None = None,
    ) -> None:
        _check_options(fmt, quality)
        self.fmt = fmt
        self.quality = quality
        self.endpoint_url = endpoint_url
        filesystem, self._root = resolve(output_uri, endpoint_url)
        self._local = isinstance(filesystem, fs.LocalFileSystem)
        self._root_uri = self._root if self._local else output_uri

    def write(self, prompt_id: str, seed: int, pixels_HWC: np.ndarray) -> StoredImage:
        """Store one image and return where, with the sha256 and size of its bytes (for the metadata record)."""
        data = encode_image(pixels_HWC, self.fmt, self.quality)
        key = image_key(prompt_id, seed, self.fmt)
        uri = join(self._root_uri, key)
        if self._local:
            _write_local_atomically(uri, [data])
        else:
            put_bytes(uri, data, CONTENT_TYPES[self.fmt], self.endpoint_url)
        return StoredImage(uri, hashlib.sha256(data).hexdigest(), len(data))


def write_imagefolder_metadata(output_uri: str, records: Iterable[dict], endpoint_url: str | None = None) -> str | None:
    """Write ``{output}/images/metadata.jsonl`` (replacing it whole, atomically), so that
    ``datasets.load_dataset("imagefolder", data_dir="{output}/images")`` loads the images with their columns.

    Each record needs ``file_name`` (the image's name in the folder); every record must have the same keys.
    Records stream through a temp file (any number of them, one at a time in memory), which is renamed into
    place or uploaded. For no records an earlier file is removed (it would list images that are gone) and nothing
    is written. Returns the file's URI, or None when there is no file.
    """
    filesystem, root = resolve(output_uri, endpoint_url)
    path = join(root, IMAGE_DIR, IMAGEFOLDER_METADATA)
    lines = ((json.dumps(record, ensure_ascii=False) + "\n").encode() for record in records)
    first = next(lines, None)
    if first is None:
        if filesystem.get_file_info(path).type == fs.FileType.File:
            filesystem.delete_file(path)
        return None
    lines = itertools.chain([first], lines)
    if isinstance(filesystem, fs.LocalFileSystem):
        _write_local_atomically(path, lines)
        return path
    uri = join(output_uri, IMAGE_DIR, IMAGEFOLDER_METADATA)
    with tempfile.NamedTemporaryFile() as temp:
        temp.writelines(lines)
        temp.flush()
        put_file(uri, temp.name, "application/jsonl", endpoint_url)
    return uri
