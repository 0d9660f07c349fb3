"""Shared test set-up: a fixed torch seed per test and a hypothesis profile fit for a shared 2-core CI machine."""
import pytest
import torch
from hypothesis import HealthCheck, settings

# Timing varies a lot on a loaded 2-core machine: no per-example deadline, no "too slow" health check.
settings.register_profile("timm_dec", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("timm_dec")


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    """Every test starts from the same global torch seed, whatever ran before it."""
    torch.manual_seed(0)
