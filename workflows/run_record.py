"""`{output}/run.json`: what one run of the job was asked to do and what it did, for people and tools."""

import json
import platform
import posixpath
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pyarrow.fs import LocalFileSystem

from storage.uris import join, resolve

RUN_FILE = "run.json"
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|api_?key|access_?key", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


PACKAGES = ("sparsevar", "torch", "ray", "pyarrow", "numpy", "transformers")


def versions() -> dict[str, str | None]:
    """Python's and the installed versions of the packages that decide what a run produces (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def redact(value: Any) -> Any:
    """A copy without secrets: values of secret-looking keys, and user:password@ in URIs, become ***."""
    if isinstance(value, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URI_USERINFO.sub("***@", value)
    return value


def write_run_json(output: str, record: dict[str, Any], endpoint_url: str | None = None) -> str:
    """Write `record` (secrets redacted) as `{output}/run.json`, replacing an earlier run's; returns its URI."""
    uri = join(output, RUN_FILE)
    filesystem, path = resolve(uri, endpoint_url)
    if isinstance(filesystem, LocalFileSystem):  # object stores have no folders to make
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(redact(record), indent=2).encode())
    return uri
