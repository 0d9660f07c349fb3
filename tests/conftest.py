"""Shared test set-up: a fixed torch seed per test, a hypothesis profile fit for a shared 2-core CI machine, a
collection order that lets the two xdist workers finish together, and a Hub that cannot be reached
(`unreachable_hub`)."""
import socket
from typing import Any

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import _http
from hypothesis import HealthCheck, settings

# Timing varies a lot on a loaded 2-core machine: no per-example deadline, no "too slow" health check.
settings.register_profile("timm_dec", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("timm_dec")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with a ``slow`` test first, then the others, each module's tests together and in their order.

    ``make test`` runs ``pytest -n 2``: xdist hands the tests out in collection order, and the last ones handed out
    decide when the run ends. In alphabetical order the Triton interpreter check (~1 min) came near the end and kept
    one worker busy ~45 s after the other had finished; with the long tests first, the short ones fill both workers
    to the end."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: the order within each group is kept


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    """Every test starts from the same global torch seed, whatever ran before it."""
    torch.manual_seed(0)


def _no_request(request: httpx2.Request) -> httpx2.Response:
    raise AssertionError(f"a request was made while offline: {request.method} {request.url}")


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the connection itself fails (as with no route or no DNS), and no HTTP request may be made."""
    def refuse(*args: Any, **kwargs: Any) -> socket.socket:
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(_no_request)))
    yield
    _http.set_client_factory(_http.default_client_factory)
