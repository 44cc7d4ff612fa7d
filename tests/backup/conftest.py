"""Fixtures for the backup engine's tests: the fake guest agent, real QEMU (each version), loop mounts."""

from tests.guest_agent.fake_agent import fake_agent, short_dir  # noqa: F401
from tests.support.loopfs import loopfs  # noqa: F401
from tests.support.qemu import pytest_runtest_makereport, qemu, qemu_vm  # noqa: F401
