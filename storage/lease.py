"""One writer per output: a lease object, `{output}/_lease.json`, that a job takes before it writes anything and
renews while it runs.

Two jobs on one output would each generate every image and record it: the metadata would hold every row twice.
So a job takes the lease first; a second job finds it held and is refused, naming the holder. A lease that was
not renewed within its time to live belongs to a job that died (kill -9, a lost node): the next job takes it over.

Taking and renewing are compare-and-swap writes, so two jobs that start together cannot both win: on S3 a
conditional PUT (If-None-Match: * to create, If-Match with the ETag read to replace); on a local disk the same
read-compare-write under an exclusive `flock` of `{output}/.lease.lock`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError
from pyarrow import fs

from storage.s3 import new_client, split_uri
from storage.uris import join, resolve

log = logging.getLogger(__name__)
LEASE_NAME = "_lease.json"


@dataclass(frozen=True)
class Holder:
    """Who holds an output's lease, and until when (UTC, ISO 8601) unless it renews."""

    run_id: str
    host: str
    pid: int
    started: str
    expires: str

    def expired(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.expires) <= now


class LeaseHeld(Exception):
    """Another job holds the output's lease."""

    def __init__(self, output: str, holder: Holder) -> None:
        super().__init__(
            f"output {output} is being written by another job (run {holder.run_id} on host {holder.host}, pid "
            f"{holder.pid}, started {holder.started}); two jobs on one output would record every image twice. Wait "
            f"for it to end, or write to another --output. If that job is dead, its lease expires by itself at "
            f"{holder.expires}: run again after that")
        self.holder = holder


class LeaseLost(RuntimeError):
    """This job's lease expired or was taken over while it ran."""


def _holder(body: dict | None, output: str) -> Holder | None:
    """The holder a lease body names; None for no lease, and for one that cannot be read (a write cut off by a
    crash), which counts as expired."""
    if body is None:
        return None
    try:
        return Holder(**body)
    except TypeError:
        log.warning("the lease of %s is unreadable (%r); taking it as expired", output, body)
        return None


class _Conflict(Exception):
    """The lease changed between reading it and writing it."""


class _LocalStore:
    """The lease file on a local disk; `swap` holds an exclusive flock while it compares and writes."""

    def __init__(self, folder: str) -> None:
        self.path, self.lock = os.path.join(folder, LEASE_NAME), os.path.join(folder, ".lease.lock")
        self.folder = folder

    def read(self) -> tuple[dict | None, bytes | None]:
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None, None
        return _parse(data), data

    def swap(self, expected: bytes | None, body: dict) -> bytes:
        os.makedirs(self.folder, exist_ok=True)
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read()[1] != expected:
                raise _Conflict
            data = json.dumps(body).encode()
            temp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
            return data

    def delete(self, expected: bytes) -> None:
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read()[1] == expected:
                os.unlink(self.path)


def _parse(data: bytes) -> dict:
    """A lease body; {} (unreadable, so expired) for bytes that are not a JSON object."""
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _os_error(exc: BotoCoreError | ClientError) -> OSError:
    """An S3 error as the OSError pyarrow would raise, naming the code (AccessDenied, NoSuchBucket, ...), or the
    client's own (no connection, no credentials)."""
    if isinstance(exc, BotoCoreError):
        return OSError(f"S3 {type(exc).__name__}: {exc}")
    error = exc.response.get("Error", {})
    return OSError(f"S3 {error.get('Code')}: {error.get('Message')}")


class _S3Store:
    """The lease object on S3 (or a compatible store), swapped with conditional PUTs; the tag is its ETag."""

    def __init__(self, uri: str, endpoint_url: str | None) -> None:
        self.bucket, self.key = split_uri(uri)
        self.s3 = new_client(endpoint_url)  # the driver's credentials now, not a client cached earlier

    def read(self) -> tuple[dict | None, str | None]:
        try:
            found = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except BotoCoreError as exc:
            raise _os_error(exc) from None
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None, None
            raise _os_error(exc) from None
        return _parse(found["Body"].read()), found["ETag"]

    def swap(self, expected: str | None, body: dict) -> str:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            put = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(body).encode(),
                                     ContentType="application/json", **condition)
        except BotoCoreError as exc:
            raise _os_error(exc) from None
        except ClientError as exc:
            conflicts = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey", "404")
            if exc.response["Error"]["Code"] in conflicts:  # changed, or gone, since it was read
                raise _Conflict from None
            raise _os_error(exc) from None
        return put["ETag"]

    def delete(self, expected: str) -> None:
        if self.read()[1] == expected:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key)


def _store(output: str, endpoint_url: str | None) -> _LocalStore | _S3Store:
    filesystem, root = resolve(output, endpoint_url)
    if isinstance(filesystem, fs.LocalFileSystem):
        return _LocalStore(root)
    return _S3Store(join(output, LEASE_NAME), endpoint_url)


def check_held(output: str, endpoint_url: str | None, run_id: str) -> None:
    """Raise LeaseLost unless run `run_id` holds the output's lease, unexpired: what a generation actor checks before
    it records a batch. The job's driver renews the lease; a driver that stalled past the lease's time to live may
    have lost it to another job, whose rows this one's must not join."""
    holder = _holder(_store(output, endpoint_url).read()[0], output)
    if holder is None or holder.run_id != run_id or holder.expired(datetime.now(UTC)):
        raise LeaseLost(f"run {run_id} no longer holds the lease on {output} (held by "
                        f"{holder.run_id if holder else 'no run'}); its actors stop before recording more. What was "
                        "written is kept: run the same command again once no other job writes the output")


class OutputLease:
    """The lease of one output for one run: `with OutputLease(...)` takes it (LeaseHeld if another live job holds
    it), renews it every third of `ttl_s` from a daemon thread, and gives it back at the end."""

    def __init__(self, output: str, endpoint_url: str | None, run_id: str, ttl_s: float) -> None:
        self.output, self.ttl = output, timedelta(seconds=ttl_s)
        self.store = _store(output, endpoint_url)
        self.started = datetime.now(UTC)
        self.run_id, self.tag = run_id, None
        self.lost, self.renewed = False, 0.0  # renewed: monotonic time of the last write that held the lease
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> dict:
        expires = datetime.now(UTC) + self.ttl
        return asdict(Holder(self.run_id, socket.gethostname(), os.getpid(), self.started.isoformat(),
                             expires.isoformat()))

    def acquire(self, attempts: int = 3) -> None:
        """Take the lease: free, expired, unreadable, or already this run's. Of jobs that take it at the same moment
        one wins; the others are refused."""
        for _ in range(attempts):
            body, tag = self.store.read()
            holder = _holder(body, self.output)
            if holder is not None and holder.run_id != self.run_id:
                if not holder.expired(datetime.now(UTC)):
                    raise LeaseHeld(self.output, holder)
                log.warning("taking over the lease of %s from run %s (host %s, pid %s), which expired at %s",
                            self.output, holder.run_id, holder.host, holder.pid, holder.expires)
            try:
                self.tag = self.store.swap(tag, self._body())
            except _Conflict:  # another job swapped first, or a retried write of ours answered 412: read again
                if self._still_ours():
                    break
                continue
            break
        else:
            holder = _holder(self.store.read()[0], self.output)
            if holder is not None:
                raise LeaseHeld(self.output, holder)
            raise OSError(f"the lease of {self.output} keeps changing under this job; try again")
        self.renewed = time.monotonic()

    def _still_ours(self) -> bool:
        """After a conflict: whether the lease is this run's all the same (a write that landed though its answer was
        lost, then retried); then its tag is taken."""
        body, tag = self.store.read()
        holder = _holder(body, self.output)
        if holder is not None and holder.run_id == self.run_id:
            self.tag = tag
            return True
        return False

    def renew(self) -> None:
        """Push the expiry on; a lease taken over meanwhile (this job stalled past its time to live) is lost."""
        try:
            self.tag = self.store.swap(self.tag, self._body())
        except _Conflict:
            if not self._still_ours():
                self.lost = True
                log.error("the lease of %s was taken over by another job while this one ran", self.output)
                return
        self.renewed = time.monotonic()

    def check(self) -> None:
        """Raise LeaseLost unless the lease is surely this run's: renewed within its time to live and not taken
        over. The job calls it before each write to the output's metadata."""
        if self.lost or time.monotonic() - self.renewed > self.ttl.total_seconds():
            raise LeaseLost(f"this job lost its lease on {self.output} (not renewed within output.lease_ttl_s, so "
                            "another job may have taken it over); it stops before writing more. What was written "
                            "is kept: run the same command again once no other job writes the output")

    def release(self) -> None:
        """Give the lease back; a store that refuses (no delete permission, down) leaves it to expire."""
        if self.lost or self.tag is None:
            return
        try:
            self.store.delete(self.tag)
        except Exception:  # noqa: BLE001 - the job's work is done; its lease then expires by itself
            log.warning("could not give back the lease of %s; it expires by itself", self.output, exc_info=True)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl.total_seconds() / 3) and not self.lost:
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a store that is down for a moment: the next renewal tries again
                log.warning("renewing the lease of %s failed; retrying", self.output, exc_info=True)

    def __enter__(self) -> OutputLease:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="output-lease", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self.release()
