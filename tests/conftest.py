"""pytest glue: a scratch working directory, and hypothesis settings for CI.

The suite runs from a scratch directory, as `trial` does (`_trial_temp`).

trial's ``TestCase.mktemp()`` makes paths relative to the working directory; this keeps
them out of the checkout. Tests never rely on the working directory: they locate the
project from ``__file__``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

# CI is a gate: the same examples every run, so a red build is reproducible. Local runs
# explore new inputs each time, and the bench env fuzzes the decoders at length.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def _scratch_working_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    try:
        yield
    finally:
        os.chdir(previous)
