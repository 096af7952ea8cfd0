"""fsha.memprofile: the benchmarks' memory dumps (off unless an env var asks)."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fsha import memprofile


class MemprofileTests(SynchronousTestCase):
    def test_allocator_stats_go_to_a_file_and_stderr_comes_back(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        before = os.fstat(2)
        path = memprofile.write_allocator_stats(directory, 3)
        self.assertEqual(path.name, f"tracemalloc-{os.getpid()}-3.txt")
        text = path.read_text()
        self.assertIn("Small block threshold", text)  # CPython's obmalloc
        self.assertIn("in use bytes", text)  # glibc's malloc_stats
        after = os.fstat(2)
        self.assertEqual((before.st_dev, before.st_ino), (after.st_dev, after.st_ino))
        self.assertEqual(list(directory.iterdir()), [path])  # no .part left

    def test_off_without_the_variables(self) -> None:
        saved = {k: os.environ.pop(k, None) for k in (memprofile.ENV, memprofile.STATS_ENV)}
        try:
            self.assertFalse(memprofile.install())
        finally:
            os.environ.update({k: v for k, v in saved.items() if v is not None})
