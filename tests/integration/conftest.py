"""Fixtures for end-to-end backups: real QEMU (each available version), real files, our CLI."""

from tests.support.qemu import pytest_runtest_makereport, qemu, qemu_vm  # noqa: F401
