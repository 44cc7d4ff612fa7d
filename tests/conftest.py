"""Suite-wide fixtures: every test runs isolated from the host's configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the config dir at an empty temp folder and drop QMPBACKUP_* from the environment.

    No test may read /etc/qmpbackup or a developer's settings.
    """
    import os

    for key in list(os.environ):
        if key.startswith("QMPBACKUP_") and key not in ("QMPBACKUP_QEMU_VERSIONS", "QMPBACKUP_CACHE"):
            monkeypatch.delenv(key)
    config_dir = tmp_path / "etc-qmpbackup"
    config_dir.mkdir()
    monkeypatch.setenv("QMPBACKUP_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("TZ", "UTC")
    yield config_dir
