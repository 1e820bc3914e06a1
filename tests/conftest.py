"""Test setup: 8 fake CPU devices (set before JAX is imported) and the shared-data locator.

Under CI (env CI set) a missing dataset or dependency fails the test instead of skipping it, so a green
run means every test really ran.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))


def require(condition: bool, reason: str) -> None:
  """Skip on a user's machine, fail under CI, when something a test needs is absent."""
  if condition:
    return
  if os.environ.get("CI"):
    pytest.fail(f"required under CI: {reason}")
  pytest.skip(reason)


@pytest.fixture
def shared_data_dir() -> pathlib.Path:
  path = shared_data()
  require(path.is_dir(), f"shared data not found at {path} (set SHARED_DATA)")
  return path
