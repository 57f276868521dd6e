"""The deployment tests' own fixture: a real tritonserver on the CPU repository `make triton-repo` writes, on free
loopback ports, one per module (the Triton tests and the images' tests compare their answers with it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kit import TRITON_SERVED, triton_repository
from tritonctl import Triton, TritonEndpoints


@pytest.fixture(scope="module")
def triton(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """Loads ``TRITON_SERVED``, or the module's own ``TRITON_LOADS``."""
    models = list(getattr(request.module, "TRITON_LOADS", TRITON_SERVED))
    server = Triton(tmp_path_factory.mktemp("triton"), triton_repository("cpu"), models, TritonEndpoints.random())
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    assert server.process is not None and server.process.poll() is not None
