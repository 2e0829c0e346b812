"""While syncs run, the cyclic garbage collector runs less often; afterwards it is as it was."""

from __future__ import annotations

import gc
import threading

import pytest
from scripted import Directory, factory, people

from dirpull.sync.collector import YOUNG, fewer_collections

TENANT = {"t": {"provider": "bamboohr", "company_domain": "acme", "api_key": "literal-key"}}


@pytest.fixture(autouse=True)
def default_thresholds():
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_a_sync_runs_with_fewer_collections_and_puts_the_thresholds_back(harness):
    seen: list[tuple[int, ...]] = []
    d = Directory(users=people(25), on_page=lambda _: seen.append(gc.get_threshold()))
    h = harness(TENANT, connector_factory=factory(d))
    assert h.sync("t").status == "succeeded"
    assert seen and all(s == (YOUNG, 10, 10) for s in seen)
    assert gc.get_threshold() == (700, 10, 10)

    d.fail_after_pages = 1  # a failed run puts them back too
    assert h.sync("t").status == "failed"
    assert gc.get_threshold() == (700, 10, 10)


def test_overlapping_syncs_restore_only_when_the_last_one_ends():
    second_in, first_out = threading.Event(), threading.Event()
    inside_second: list[tuple[int, ...]] = []

    def second() -> None:
        with fewer_collections():
            second_in.set()
            first_out.wait(10)
            inside_second.append(gc.get_threshold())

    with fewer_collections():
        worker = threading.Thread(target=second)
        worker.start()
        assert second_in.wait(10)
    first_out.set()
    worker.join(10)
    assert inside_second == [(YOUNG, 10, 10)]  # the first sync's end left the second one's setting
    assert gc.get_threshold() == (700, 10, 10)


def test_a_higher_threshold_set_by_the_operator_is_kept():
    gc.set_threshold(200_000, 5, 5)
    with fewer_collections():
        assert gc.get_threshold() == (200_000, 5, 5)
    assert gc.get_threshold() == (200_000, 5, 5)


def test_an_error_inside_restores_the_thresholds():
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("boom")
    assert gc.get_threshold() == (700, 10, 10)
