"""Fixtures for the QEMU control plane tests: real QEMU, each available version."""

from tests.support.qemu import pytest_runtest_makereport, qemu, qemu_vm  # noqa: F401
