"""Shared test set-up: a fixed torch seed per test, a hypothesis profile fit for a shared 2-core CI machine, and a
Hub that cannot be reached (`unreachable_hub`)."""
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
