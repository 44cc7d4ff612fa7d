"""Recovery tests run against real QEMU (each version) and the real test guest."""

from tests.support.qemu import pytest_runtest_makereport, qemu, qemu_vm  # noqa: F401
