"""memberflow.app.settle_heap: what a worker does to its garbage collector once started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from memberflow.app import FULL_COLLECTION_EVERY, settle_heap


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_startup_objects_are_frozen_and_full_collections_made_rarer() -> None:
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    settle_heap()
    assert gc.get_freeze_count() > 0
    # Young collections as before; a full one at most every 100 middle ones, not every 10.
    assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)
    assert FULL_COLLECTION_EVERY >= 100
