"""Helpers shared by the packed-runtime tests."""
import threading

import pytest
import torch


def _mismatches_under_threads(rt, x, calls: int) -> list[int]:
    """Run every level of ``rt`` in its own thread at once, ``calls`` times each; return the
    levels whose output ever differed from that level's single-threaded output."""
    levels = range(rt.spec.num_levels)
    refs = [rt(x, level=k) for k in levels]
    errors, barrier = [], threading.Barrier(len(refs))

    def worker(k):
        barrier.wait()
        for _ in range(calls):
            if not torch.equal(rt(x, level=k), refs[k]):
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in levels]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def mismatches_under_threads():
    return _mismatches_under_threads
