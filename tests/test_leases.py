"""One writer per job, in-process on file:// storage (the S3 preconditions are exercised by the
end-to-end tests against SeaweedFS): the lease itself, and the driver's use of it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator import lease
from orchestrator.storage import open_storage
from support import offline_driver

TRAIN = {"kind": "train", "family": "ddpm", "data": {"dataset": "digits", "image_size": 8},
         "model": {"channels": 8, "channel_mult": [1], "timesteps": 10}, "train": {"steps": 2}}


@pytest.fixture()
def storage(tmp_path):
    return open_storage(f"file://{tmp_path / 'store'}").child("e/job/h")


def test_of_many_drivers_one_takes_the_lease(storage):
    drivers = [lease.this_driver() for _ in range(16)]
    got: list = [None] * 16
    start = threading.Barrier(16)

    def take(i: int) -> None:
        start.wait()
        got[i] = lease.acquire(storage, drivers[i])

    threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [i for i, g in enumerate(got) if isinstance(g, lease.Lease)]
    assert len(held) == 1
    taken = [g for g in got if isinstance(g, lease.Taken)]
    assert len(taken) == 15 and {t.holder.driver for t in taken} == {drivers[held[0]].driver}
    assert lease.conditional_writes(storage)


def test_our_own_lease_whose_answer_was_lost_is_ours(storage):
    me = lease.this_driver()
    first = lease.acquire(storage, me)
    again = lease.acquire(storage, me)  # as when botocore retries a put that went through
    assert isinstance(again, lease.Lease) and again.etag == first.etag


def test_a_lease_not_renewed_is_taken_over_and_its_holder_learns_it_lost(storage, monkeypatch):
    a, b = lease.this_driver(), lease.this_driver()
    keeper = lease.Keeper(a)
    keeper.hold("job", lease.acquire(storage, a))
    seen = lease.acquire(storage, b)
    assert isinstance(seen, lease.Taken) and not lease.stale(seen, lambda h: False)

    keeper.renew()  # a renewal is a change: a waiter starts counting again
    seen = lease.look(storage, seen)
    assert seen is not None and not lease.stale(seen, lambda h: False)
    assert lease.take_over(storage, lease.Taken(seen.holder, "old-etag"), b) is None

    monkeypatch.setattr(lease, "TTL_S", 0.0)  # no renewal for TTL_S: stale
    assert lease.stale(lease.look(storage, seen), lambda h: False)
    taken = lease.take_over(storage, seen, b)
    assert isinstance(taken, lease.Lease)
    keeper.renew()
    assert keeper.lost() == {"job"} and not keeper.holds("job")
    keeper.close()
    assert lease.look(storage, lease.Taken(None, taken.etag)) is not None  # not released by a


def test_a_holder_known_dead_is_stale_at_once(storage):
    a, b = lease.this_driver("01000000", "gcs:1"), lease.this_driver("02000000", "gcs:1")
    lease.acquire(storage, a)
    seen = lease.acquire(storage, b)
    assert lease.stale(seen, lambda h: h.ray_job == "01000000")
    jobs = lease.RayJobs("gcs:1")
    jobs._ended, jobs._asked = {"01000000"}, time.monotonic()
    assert jobs.dead(seen.holder) and not jobs.ended("01000000", "another-cluster:1")


def test_ray_jobs_asks_the_dashboard_of_the_drivers_own_cluster(monkeypatch):
    """Without an address, Ray's state API picks "the latest" of the clusters running on the
    host: a driver would judge the holders of its leases by another cluster's jobs."""
    import ray.util.state

    asked = []

    def list_jobs(*, address=None, **kwargs):
        asked.append(address)
        return [SimpleNamespace(job_id="01000000", status="SUCCEEDED")]

    monkeypatch.setattr(ray.util.state, "list_jobs", list_jobs)
    jobs = lease.RayJobs("gcs:1", dashboard="http://127.0.0.1:8265")
    assert jobs.ended("01000000", "gcs:1") and asked == ["http://127.0.0.1:8265"]


def test_a_driver_waits_for_a_job_another_driver_runs_then_takes_its_result(tmp_path):
    driver = offline_driver(tmp_path, [{"name": "a", **TRAIN}])
    state = driver.jobs["a"]
    other = lease.this_driver("09000000", "elsewhere:1")
    held = lease.acquire(driver._storage(state), other)
    driver._claim(state)
    assert state.status == "elsewhere" and state.taken.holder.driver == other.driver

    driver._watch_elsewhere()
    assert state.status == "elsewhere"  # still held, not stale
    driver._storage(state).put_bytes("result.json", b'{"status": "finished", "checkpoint": "c"}')
    held.storage.delete_if_match(lease.LEASE_KEY, held.etag)
    driver._watched = 0.0
    driver._watch_elsewhere()
    assert state.status == "cached" and state.result["checkpoint"] == "c"


def test_a_job_let_go_by_another_driver_is_run_here_in_its_run(tmp_path):
    driver = offline_driver(tmp_path, [{"name": "a", **TRAIN}])
    state = driver.jobs["a"]
    held = lease.acquire(driver._storage(state), lease.this_driver())
    driver._claim(state)
    held.storage.delete_if_match(lease.LEASE_KEY, held.etag)  # stopped there, no result
    driver._watched = 0.0
    driver._watch_elsewhere()
    assert state.status == "queued" and driver.runs["a"].adopt and driver.leases.holds("a")
    driver.leases.close()


def test_a_forced_job_clears_what_an_earlier_run_left_once_it_holds_the_lease(tmp_path):
    driver = offline_driver(tmp_path, [{"name": "a", **TRAIN},
                                       {"name": "s", "kind": "sample", "family": "ddpm",
                                        "from": "a"}])
    driver.force = {"a"} | driver.plan.dependents("a")
    assert driver.force == {"a", "s"}  # what read the forced job is made again too
    state = driver.jobs["a"]
    store = driver._storage(state)
    for key in ("result.json", "checkpoints/step-000002/manifest.json",
                "checkpoints/step-000002/model.safetensors", "checkpoints/LATEST", "pins/r1"):
        store.put_bytes(key, b"{}")
    assert driver._cached(state) is None
    driver._claim(state)
    assert state.status == "queued"
    assert sorted(store.list()) == ["LEASE", "pins/r1"]
    driver.leases.close()
    assert store.list() == ["pins/r1"]


def test_storage_away_for_a_moment_delays_a_job_and_for_long_fails_it(tmp_path, monkeypatch):
    from orchestrator import driver as driver_module
    from orchestrator.storage import StorageError

    driver = offline_driver(tmp_path, [{"name": "a", **TRAIN}, {"name": "b", **TRAIN},
                                       {"name": "s", "kind": "sample", "family": "ddpm",
                                        "from": "b"}])
    away = {"a", "b"}
    real = driver._cached

    def cached(state):
        if state.name in away:
            raise StorageError("cannot reach S3 endpoint http://s3:1 to read result.json")
        return real(state)

    monkeypatch.setattr(driver, "_cached", cached)
    with driver_module.ThreadPoolExecutor(2) as driver._lookups:
        driver._ready()
        assert {n: s.status for n, s in driver.jobs.items()} == {
            "a": "pending", "b": "pending", "s": "pending"}
        assert driver._waiting_to_settle()  # the loop goes on: it is looked at again
        away.discard("a")  # back for a
        driver._ready()
        assert driver.jobs["a"].status == "queued" and driver.jobs["a"].unreachable_since is None
        monkeypatch.setattr(driver_module, "STORAGE_PATIENCE_S", 0.0)
        driver._ready()
    b = driver.jobs["b"]
    assert b.status == "failed" and b.error.startswith("storage unreachable for ")
    assert driver.jobs["s"].status == "skipped"
    driver.leases.close()


def test_the_lease_of_a_driver_that_ended_goes_with_its_runs(storage):
    dead, alive = lease.this_driver("01000000", "gcs:1"), lease.this_driver("02000000", "gcs:1")
    lease.acquire(storage, alive)
    assert not lease.drop_if_held_by(storage, "01000000", "gcs:1")  # not the dead one's
    storage.delete(lease.LEASE_KEY)
    lease.acquire(storage, dead)
    assert not lease.drop_if_held_by(storage, "01000000", "other:1")
    assert lease.drop_if_held_by(storage, "01000000", "gcs:1")
    assert not storage.exists(lease.LEASE_KEY)


def test_a_release_while_storage_is_away_is_tried_again(storage):
    from orchestrator.storage import StorageError

    me = lease.this_driver()
    errors: list[str] = []
    keeper = lease.Keeper(me, on_error=errors.append)
    held = lease.acquire(storage, me)
    keeper.hold("job", held)
    real, away = storage.delete_if_match, {"left": 2}

    def delete_if_match(key, etag):
        if away["left"]:
            away["left"] -= 1
            raise StorageError("cannot reach S3 endpoint http://s3:1 to delete LEASE")
        return real(key, etag)

    storage.delete_if_match = delete_if_match
    keeper.release("job")
    assert storage.exists(lease.LEASE_KEY) and len(errors) == 1
    keeper.renew()  # still away: said once only
    assert storage.exists(lease.LEASE_KEY) and len(errors) == 1
    keeper.close(patience=5)
    assert not storage.exists(lease.LEASE_KEY)
