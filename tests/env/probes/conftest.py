"""The probe tests fit on one BLAS thread: lbfgs and Newton steps on many threads of a busy
CPU were far slower, and one thread gives the same numbers in any process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield
