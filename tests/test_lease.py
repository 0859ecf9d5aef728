"""One writer per output: the lease on a local folder and on S3 (moto's server), without Ray."""

import json
import threading
import time

import pytest

from storage.lease import LEASE_NAME, LeaseHeld, OutputLease


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, str | None]:
    """(output URI, endpoint) of an empty output on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    return f"s3://bucket/lease-{tmp_path.name}", request.getfixturevalue("s3_endpoint")


def read_lease(uri: str, endpoint: str | None) -> dict:
    lease = OutputLease(uri, endpoint, "reader", 1.0)
    return lease.store.read()[0]


def test_a_second_job_is_refused_naming_the_holder_until_the_first_gives_the_lease_back(output):
    uri, endpoint = output
    with OutputLease(uri, endpoint, "first", 30.0):
        holder = read_lease(uri, endpoint)
        assert holder["run_id"] == "first" and holder["pid"] > 0 and holder["host"]
        with pytest.raises(LeaseHeld) as refused:
            OutputLease(uri, endpoint, "second", 30.0).acquire()
        message = str(refused.value)
        assert f"output {uri} is being written by another job (run first on host {holder['host']}" in message
        assert f"expires by itself at {holder['expires']}" in message
    assert read_lease(uri, endpoint) is None  # given back
    with OutputLease(uri, endpoint, "second", 30.0):
        assert read_lease(uri, endpoint)["run_id"] == "second"


def test_a_dead_jobs_lease_expires_and_is_taken_over_while_a_live_one_is_renewed(output):
    uri, endpoint = output
    dead = OutputLease(uri, endpoint, "dead", 0.5)
    dead.acquire()  # never renewed nor given back, as after kill -9
    with pytest.raises(LeaseHeld):
        OutputLease(uri, endpoint, "early", 0.5).acquire()
    time.sleep(0.6)
    with OutputLease(uri, endpoint, "live", 0.6):
        time.sleep(1.5)  # past its time to live: only the renewals keep it
        with pytest.raises(LeaseHeld):
            OutputLease(uri, endpoint, "late", 0.6).acquire()
        assert read_lease(uri, endpoint)["run_id"] == "live"
    dead.renew()  # the dead job wakes up: its lease was taken over
    assert dead.lost


def test_of_jobs_that_start_together_exactly_one_takes_the_lease(output):
    uri, endpoint = output
    won, refused = [], []
    start = threading.Barrier(6)

    def take(run_id: str) -> None:
        lease = OutputLease(uri, endpoint, run_id, 30.0)
        start.wait()
        try:
            lease.acquire()
            won.append(run_id)
        except LeaseHeld:
            refused.append(run_id)

    threads = [threading.Thread(target=take, args=(f"job{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 5
    assert read_lease(uri, endpoint)["run_id"] == won[0]


def test_the_lease_is_a_small_json_object_in_the_output(tmp_path):
    with OutputLease(str(tmp_path), None, "run1", 30.0):
        body = json.loads((tmp_path / LEASE_NAME).read_text())
    assert set(body) == {"run_id", "host", "pid", "started", "expires"}
