"""Suite-wide fixtures: every test runs isolated from the host's configuration."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


#: Modules whose tests share a booted guest or helper VM (module-scoped fixtures, one per QEMU
#: version where the fixture is parametrized): under pytest-xdist their tests go to one worker as
#: one unit per version, so each VM boots once.
SHARED_VM_MODULES = (
    "tests/integration/test_freeze_guard.py",
    "tests/guest_agent/test_real_guest.py",
    "tests/file_restore/test_file_restore.py",
)
_QEMU_ID = re.compile(r"qemu\d+\.\d+")


def work_unit(nodeid: str) -> str:
    """What xdist hands a worker at once: a test, or a :data:`SHARED_VM_MODULES` module's tests of one version."""
    module = nodeid.split("::")[0]
    if module not in SHARED_VM_MODULES:
        return nodeid
    version = _QEMU_ID.search(nodeid)
    return f"{module}-{version.group() if version else ''}"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Tests one by one to the next free worker, except the units of :func:`work_unit`.

    (xdist's own ``--dist loadgroup`` marks do not take with pytest 9, whose node ids no longer
    come from the attribute xdist rewrites.) Larger units are handed out first. Another ``--dist``
    given on the command line is left to xdist.
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class SharedVmScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SharedVmScheduling(config, log)


def _rank(item: pytest.Item) -> int:
    return 0 if item.get_closest_marker("guest") else 1 if item.get_closest_marker("qemu") else 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that boot guests first, then those that start QEMU, then the rest (each module's
    tests stay together and in order), so that the longest tests do not start last on a worker;
    and the values of :func:`_spread_away` parameters spread over the QEMU versions."""
    spread = [item for item in items if not _spread_away(item)]
    if len(spread) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if _spread_away(item)])
        items[:] = spread
    module_rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        module_rank[module] = min(module_rank.get(module, 2), _rank(item))
    items.sort(key=lambda item: module_rank[item.nodeid.split("::")[0]])


def _spread_away(item: pytest.Item) -> bool:
    """Whether ``@pytest.mark.spread_over_qemu("name")`` hands this value of ``name`` to another QEMU.

    For a parameter whose values do not meet QEMU's behaviour (the archive's compression, the file
    system under the disks), each value runs on one QEMU version in turn instead of on all of them;
    every version still runs the test. With one version selected, every value runs on it.
    """
    from tests.support.qemu import selected_versions

    mark = item.get_closest_marker("spread_over_qemu")
    callspec = getattr(item, "callspec", None)
    versions = selected_versions()
    if mark is None or callspec is None or "qemu" not in callspec.params or len(versions) < 2:
        return False
    return bool(versions[callspec.indices[mark.args[0]] % len(versions)] != callspec.params["qemu"])


_SHORT_BASETEMP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, the workers' temp folders in a short private folder of this run.

    xdist puts each worker's folders one level deeper (``popen-gwN/``), which pushes the unix
    sockets of QEMUs started in a test's state dir past the 107-byte limit; ``/tmp/qbt-XXXXXXXX``
    is shorter than pytest's own ``/tmp/pytest-of-USER/pytest-N`` by more than that level.
    """
    if getattr(config.option, "numprocesses", None) and not config.option.basetemp \
            and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="qbt-", dir="/tmp")
        config.stash[_SHORT_BASETEMP] = config.option.basetemp


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The short folder goes when every test passed (a failed test's files stay to be looked at)."""
    folder = session.config.stash.get(_SHORT_BASETEMP, None)
    if folder and exitstatus == 0:
        shutil.rmtree(folder, ignore_errors=True)
