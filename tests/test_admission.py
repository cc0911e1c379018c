"""Admission's books against a stated view of the cluster: priority first, then the earliest;
nothing jumps a job that waits; grants hold their resources until Ray shows them."""

from __future__ import annotations

import time

import pytest

from orchestrator import admission
from orchestrator.admission import Admission
from orchestrator.spec import Resources
from support import offline_driver


@pytest.fixture()
def cluster(monkeypatch):
    view = {"total": {"CPU": 4.0, "GPU": 2.0}, "free": {"CPU": 4.0, "GPU": 2.0}, "now": 0.0}
    monkeypatch.setattr(admission.ray, "cluster_resources", lambda: dict(view["total"]))
    monkeypatch.setattr(admission.ray, "available_resources", lambda: dict(view["free"]))
    monkeypatch.setattr(admission.time, "monotonic", lambda: view["now"])
    return view


def gpus(n: float) -> dict[str, float]:
    return {"CPU": 1.0, "GPU": n}


def test_higher_priority_first_then_the_earliest(cluster):
    a = Admission()
    cluster["free"]["GPU"] = 0.0  # full
    assert a.ask([("low", 0, gpus(1))]) == []
    assert a.ask([("high", 5, gpus(1)), ("low2", 0, gpus(1))]) == []
    assert [q["ticket"] for q in a.queue()] == ["high", "low", "low2"]
    cluster["free"]["GPU"] = 1.0  # one GPU comes free
    assert a.ask([("low", 0, gpus(1))]) == []
    assert a.ask([("high", 5, gpus(1))]) == ["high"]
    # Ray's view has not caught up: the grant still holds the GPU in admission's books
    assert a.ask([("low", 0, gpus(1)), ("low2", 0, gpus(1))]) == []
    cluster["free"]["GPU"] = 2.0
    assert a.ask([("low", 0, gpus(1)), ("low2", 0, gpus(1))]) == ["low"]


def test_a_job_that_waits_for_room_is_not_jumped(cluster):
    a = Admission()
    cluster["free"]["GPU"] = 1.0
    assert a.ask([("big", 3, gpus(2)), ("small", 0, gpus(0.25))]) == []
    cluster["free"]["GPU"] = 2.0
    assert a.ask([("big", 3, gpus(2)), ("small", 0, gpus(0.25))]) == ["big"]


def test_fractional_requests_pack(cluster):
    a = Admission()
    asks = [(f"s{i}", 0, {"CPU": 0.25, "GPU": 0.25}) for i in range(10)]
    assert len(a.ask(asks)) == 8  # 2 GPUs hold 8 quarter-GPU jobs


def test_more_than_the_cluster_has_is_left_to_ray(cluster):
    a = Admission()
    cluster["free"]["GPU"] = 1.0
    assert a.ask([("huge", 9, gpus(8)), ("one", 0, gpus(1))]) == ["huge", "one"]


def test_books_settle_and_forget(cluster):
    a = Admission()
    assert a.ask([("a", 0, gpus(2))]) == ["a"]
    cluster["free"]["GPU"] = 0.0  # Ray now shows it...
    a.started(["a"])
    cluster["now"] += admission.SETTLE_S + 1
    cluster["free"]["GPU"] = 2.0  # ...and it finished
    assert a.ask([("b", 0, gpus(2))]) == ["b"]
    cluster["free"]["GPU"] = 0.0
    assert a.ask([("c", 0, gpus(1))]) == []
    cluster["now"] += admission.FORGET_S + 1  # c's driver went away: c is forgotten
    assert a.ask([("d", -1, gpus(1))]) == []
    assert [q["ticket"] for q in a.queue()] == ["d"]
    cluster["now"] += admission.GRANT_HOLD_S  # b never said it started: its grant lapses
    cluster["free"]["GPU"] = 2.0
    assert a.ask([("d", -1, gpus(1))]) == ["d"]


def test_a_grant_of_a_driver_that_died_before_its_job_started_lapses_like_a_request(cluster):
    """Its driver was killed between the grant and `started`: the grant held the cluster's
    room in admission's books for GRANT_HOLD_S while Ray showed it free, and every other
    pipeline's jobs waited (two minutes in bench/chaos.py). A live driver names the grants
    it still holds each time it asks, so only a silent driver's grants lapse early."""
    a = Admission()
    assert a.ask([("dead", 0, gpus(2)), ("live", 0, {"CPU": 1.0})]) == ["dead", "live"]
    cluster["now"] += admission.FORGET_S / 2
    assert a.ask([], holding=["live"]) == []
    cluster["now"] += admission.FORGET_S / 2 + 1
    assert a.ask([("next", 0, gpus(2))], holding=["live"]) == ["next"]  # the dead one's room
    cluster["now"] += admission.FORGET_S / 2
    assert a.ask([("more", 0, {"CPU": 3.0})], holding=["live"]) == []  # live still holds 1
    assert a.ask([], holding=["gone"]) == []  # a grant it no longer has is nothing


def test_requests_of_a_data_parallel_job_count_every_worker():
    r = Resources(workers=4, cpus=2, gpus_per_worker=0.5)
    assert admission.request(r) == {"CPU": 8, "GPU": 2.0}
    assert admission.request(Resources(cpus=1, gpus=0.25)) == {"CPU": 1, "GPU": 0.25}


def test_an_idle_actor_is_taken_over_unless_a_higher_priority_job_waits(cluster):
    a = Admission()
    cluster["free"]["GPU"] = 0.0  # the idle actor's GPU is among those in use
    assert a.ask([], [("next", 0)]) == ["next"]
    assert a.ask([("urgent", 5, gpus(1))]) == []  # another pipeline's job waits for room
    assert a.ask([], [("next2", 0)]) == []  # so the idle actor is freed for it instead
    assert a.ask([], [("urgent2", 5)]) == ["urgent2"]  # equal priority may take over


def test_a_pipeline_waiting_for_room_asks_once_a_poll_even_with_jobs_waiting_on_it(tmp_path,
                                                                                   monkeypatch):
    """The cluster is full of other pipelines' jobs: the train job waits for room and the
    sample job reading it waits for the train job. The driver asks admission again once every
    POLL_S, and does not spin."""
    from orchestrator import driver as driver_module

    driver = offline_driver(tmp_path, [
        {"name": "train", "kind": "train", "family": "ddpm",
         "data": {"dataset": "digits", "image_size": 16}, "train": {"steps": 5}},
        {"name": "sample", "kind": "sample", "family": "ddpm", "from": "train"}])
    monkeypatch.setattr(driver_module, "POLL_S", 0.2)
    asked, start = [], time.monotonic()

    def admit_nothing() -> None:  # the cluster stays full; after a second the user gives up
        asked.append(driver.jobs["train"].status)
        if len(asked) > 1000 or time.monotonic() - start >= 1.0:
            driver.jobs["train"].status = "killed"
            driver.jobs["sample"].status = "skipped"

    monkeypatch.setattr(driver, "_admit", admit_nothing)
    driver._loop()
    assert asked[0] == "queued" and driver.jobs["sample"].status == "skipped"
    assert 4 <= len(asked) <= 6  # once at the start, then once a POLL_S for a second


def test_a_driver_names_the_grants_its_unconfirmed_jobs_hold(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from orchestrator import driver as driver_module

    driver = offline_driver(tmp_path, [
        {"name": "train", "kind": "train", "family": "ddpm",
         "data": {"dataset": "digits", "image_size": 16}, "train": {"steps": 5}}])
    state = driver.jobs["train"]
    state.status, state.alive = "running", False  # launched; its actor has not answered yet
    calls = []
    driver.admission = SimpleNamespace(ask=SimpleNamespace(
        remote=lambda *args: calls.append(args) or []))
    monkeypatch.setattr(driver_module.ray, "get", lambda value, timeout=None: value)
    driver._admit()
    assert calls == [([], [], [driver._ticket(state)])]
    state.alive = True  # it holds its resources in Ray's view: nothing to ask about
    driver._admit()
    assert len(calls) == 1
