"""One writer per output: the lease on a local folder and on S3 (moto's server), without Ray."""

import json
import threading
import time

import pytest

from storage.lease import LEASE_NAME, LeaseHeld, LeaseLost, OutputLease, check_held


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
    dead = OutputLease(uri, endpoint, "dead", 1.0)
    dead.acquire()  # never renewed nor given back, as after kill -9
    with pytest.raises(LeaseHeld):
        OutputLease(uri, endpoint, "early", 1.0).acquire()
    time.sleep(1.1)
    with OutputLease(uri, endpoint, "live", 3.0):  # renewed every second: slack for a loaded machine
        time.sleep(4.0)  # past its time to live: only the renewals keep it
        with pytest.raises(LeaseHeld):
            OutputLease(uri, endpoint, "late", 3.0).acquire()
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


def test_a_conflict_on_a_lease_that_is_still_ours_is_no_loss(output):
    """A write that landed though its answer was lost is retried and answered 412: the lease is still this run's."""
    uri, endpoint = output
    lease = OutputLease(uri, endpoint, "mine", 30.0)
    lease.acquire()
    lease.tag = b"stale" if endpoint is None else '"stale-etag"'  # what we held before the lost answer
    lease.renew()
    assert not lease.lost
    lease.check()  # nothing to raise
    assert read_lease(uri, endpoint)["run_id"] == "mine"


def test_a_lease_taken_over_stops_the_job_before_its_next_write(output):
    uri, endpoint = output
    stalled = OutputLease(uri, endpoint, "stalled", 0.3)
    stalled.acquire()
    time.sleep(0.4)  # not renewed within its time to live
    with pytest.raises(LeaseLost, match="lost its lease"):
        stalled.check()
    OutputLease(uri, endpoint, "other", 30.0).acquire()
    stalled.renew()
    assert stalled.lost


def test_an_actor_records_only_while_its_run_holds_the_lease(output):
    uri, endpoint = output
    with pytest.raises(LeaseLost, match="held by no run"):
        check_held(uri, endpoint, "mine")
    mine = OutputLease(uri, endpoint, "mine", 0.3)
    mine.acquire()
    check_held(uri, endpoint, "mine")
    with pytest.raises(LeaseLost, match="held by mine"):
        check_held(uri, endpoint, "other")
    time.sleep(0.4)  # the driver stalled past the time to live
    with pytest.raises(LeaseLost, match="no longer holds"):
        check_held(uri, endpoint, "mine")
    OutputLease(uri, endpoint, "other", 30.0).acquire()
    with pytest.raises(LeaseLost, match="held by other"):
        check_held(uri, endpoint, "mine")


def test_an_unreadable_lease_counts_as_expired(tmp_path):
    (tmp_path / LEASE_NAME).write_text('{"run_id": "cut-off-wri')  # a write cut off by a crash
    with OutputLease(str(tmp_path), None, "next", 30.0):
        assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == "next"
