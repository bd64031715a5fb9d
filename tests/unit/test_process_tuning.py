"""The memory tuning of a service process: a batch's buffers are reused by the next batch without
page faults (glibc), and an operator's own MALLOC_* settings are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.runtime.tuning import tune_malloc
from tests.fixtures.processes import service_env

# A batch as a service has it: six 4 MiB buffers alive at once, then all freed; ten batches.
BATCHES = """
import resource, sys
from shared.runtime.tuning import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc({}) is True
def batch():
    buffers = [bytearray(4 << 20) for _ in range(6)]  # zero-filled: every page is touched
    del buffers
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_BATCH = 6 * (4 << 20) // os.sysconf("SC_PAGE_SIZE")

glibc_only = pytest.mark.skipif(
    not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's malloc only"
)


def page_faults(mode: str) -> int:
    env = service_env({})
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    done = subprocess.run(
        [sys.executable, "-c", BATCHES, mode], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_the_next_batch_reuses_the_memory_of_the_last_without_page_faults() -> None:
    untuned, tuned = page_faults("default"), page_faults("tuned")
    # glibc's defaults: the buffers are mapped and unmapped again, every page faulted in per batch
    assert untuned >= 10 * PAGES_PER_BATCH // 2
    # tuned: the freed heap is kept and reused, a batch faults in (almost) nothing
    assert tuned < PAGES_PER_BATCH // 10


def test_an_operators_malloc_settings_are_left_alone() -> None:
    assert tune_malloc({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
    assert tune_malloc({"MALLOC_MMAP_THRESHOLD_": "131072"}) is False
