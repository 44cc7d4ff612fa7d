"""Storages: config checks, the capability probe on real loop mounts (ext4, xfs, btrfs), the
space rule, image creation on dir storages, and lvmthin/zfspool commands.

Device-mapper thin pools and ZFS are not available on these machines: their tests check the
exact commands through a recording runner that answers like lvs/zfs would.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fleecing.errors import CommandFailed, FleecingConfigError, FleecingSpaceError
from fleecing.images import create_image, free_image, image_exists, next_free_image
from fleecing.probe import SpaceProbe, allocated_bytes, probe_directory
from fleecing.storage import MIN_FREE_BYTES, check_space, fleecing_storage, plan_fleecing
from qmpbackup.jobs.storage_cfg import parse_storage_cfg
from tests.fleecing.conftest import MiB, LoopFs, dir_storage
from tests.support.qemu import available_versions

GiB = 1 << 30
CFG = """dir: local
\tpath /var/lib/vz
\tcontent iso,backup

dir: scratch
\tpath /srv/scratch
\tcontent images
\tdisable

nfs: nas
\tpath /mnt/pve/nas
\tserver 10.0.0.1
\texport /x
\tcontent images

lvmthin: thin
\tvgname pve
\tthinpool data
\tcontent images

zfspool: tank
\tpool tank/vms
\tsparse 1
\tblocksize 64k
\tcontent images

pbs: backup
\tdatastore x
\tserver y
"""


def storages() -> dict[str, object]:
    return parse_storage_cfg(CFG, "/etc/qmpbackup/storage.cfg")  # type: ignore[return-value]


@pytest.mark.parametrize(("sid", "message"), [
    ("nope", "fleecing storage 'nope' does not exist in storage.cfg"),
    ("scratch", "fleecing storage 'scratch' is disabled (/etc/qmpbackup/storage.cfg:5)"),
    ("backup", "is of type pbs"),
    ("local", "does not allow disk images"),
])
def test_unusable_storages_are_refused(sid: str, message: str) -> None:
    with pytest.raises(FleecingConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        fleecing_storage(storages(), sid)  # type: ignore[arg-type]
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def probe(free: int, *, thin: bool = True, discard: bool = True) -> SpaceProbe:
    return SpaceProbe("x", None, "ext4", thin, discard, False, free, free * 2)


@pytest.mark.parametrize(("free", "thin", "discard", "prealloc", "outcome"), [
    (10 * GiB, True, True, None, "ok"),
    (1 * GiB, True, True, None, "warn-small"),  # reclaim keeps the peak small: allowed, warned
    (1 * GiB, True, False, None, "refuse"),  # cannot give space back: needs the worst case
    (10 * GiB, True, False, None, "warn-discard"),
    (1 * GiB, False, True, None, "refuse"),  # thick allocation
    (1 * GiB, True, True, "falloc", "refuse"),
    (MIN_FREE_BYTES - 1, True, True, None, "refuse"),
])
def test_space_rule(free: int, thin: bool, discard: bool, prealloc: str | None, outcome: str) -> None:
    storage = dir_storage(Path("/srv/f"), extra=f"\tpreallocation {prealloc}\n" if prealloc else "")
    sizes = [2 * GiB, 1 * GiB]
    if outcome == "refuse":
        with pytest.raises(FleecingSpaceError) as e:
            check_space(storage, probe(free, thin=thin, discard=discard), sizes)
        assert "'fleece'" in str(e.value) and "\n" not in str(e.value)
        assert e.value.needed_bytes == 3 * GiB
        return
    plan = check_space(storage, probe(free, thin=thin, discard=discard), sizes)
    assert plan.format == "qcow2"
    if outcome == "ok":
        assert plan.warnings == () and plan.preallocation == "metadata"
    elif outcome == "warn-small":
        assert "the backup fails (the guest does not)" in plan.warnings[0]
    elif outcome == "warn-discard":
        assert "does not support discard" in plan.warnings[0] and plan.preallocation == "off"


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
async def test_dir_storage_on_real_filesystems(fstype: str, loopfs: Callable[[str, int], LoopFs],
                                               tmp_path: Path) -> None:
    versions = available_versions()
    qemu_img = str(next(iter(versions.values())).img) if versions else "qemu-img"
    fs = loopfs(fstype, 64 * MiB)
    result = probe_directory(fs.mountpoint)
    assert result.thin and result.discard, result
    assert result.fstype == fstype and result.device == fs.device
    assert result.rotational is not None
    assert 0 < result.free_bytes <= result.total_bytes
    storage = dir_storage(fs.mountpoint)
    plan = await plan_fleecing(storage, [32 * MiB])
    image = await next_free_image(plan, 100, 32 * MiB + 4096, set())
    assert image.name == "vm-100-fleece-0.qcow2"
    await create_image(image, plan, qemu_img=qemu_img)
    info = subprocess.run([qemu_img, "info", "--output=json", image.path], capture_output=True, text=True,
                          check=True).stdout
    assert '"virtual-size": 33558528' in info and '"cluster-size": 65536' in info
    assert await image_exists(image)
    second = await next_free_image(plan, 100, MiB, {image.name})
    assert second.name == "vm-100-fleece-1.qcow2"
    await free_image(image)
    await free_image(image)
    assert not Path(image.path).exists()
    assert not list(fs.mountpoint.glob(".qmpbackup-probe-*"))


async def test_no_space_on_real_filesystem_is_refused(loopfs: Callable[[str, int], LoopFs]) -> None:
    fs = loopfs("ext4", 8 * MiB)
    with pytest.raises(FleecingSpaceError, match="full"):
        await plan_fleecing(dir_storage(fs.mountpoint, extra="\tpreallocation full\n"), [GiB, GiB])
    (fs.mountpoint / "fill").write_bytes(b"x" * (int(probe_directory(fs.mountpoint).free_bytes) - MiB))
    with pytest.raises(FleecingSpaceError, match=r"is \(nearly\) full"):
        await plan_fleecing(dir_storage(fs.mountpoint), [16 * MiB])


def test_allocated_bytes_sees_holes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
        f.write(b"a" * MiB)
    assert MiB <= allocated_bytes(p) < 4 * MiB


class RecordingRunner:
    """Records argv; answers lvs/zfs queries like the real tools would."""

    def __init__(self, answers: dict[str, str], missing: frozenset[str] | set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers
        self.missing = set(missing)

    async def __call__(self, argv: Sequence[str], timeout: float = 60) -> str:
        self.calls.append(list(argv))
        key = " ".join(argv)
        for volume in self.missing:
            if key.endswith(volume) and argv[0] in ("lvs", "zfs") and argv[1] in ("--noheadings", "list"):
                raise CommandFailed(argv, 5, f"Failed to find logical volume \"{volume}\"")
        if argv[0] == "lvcreate":
            self.missing.discard(f"pve/{argv[argv.index('--name') + 1]}")
        if argv[:2] == ["zfs", "create"]:
            self.missing.discard(argv[-1])
        if argv[0] in ("lvremove",) or argv[:2] == ["zfs", "destroy"]:
            self.missing.add(argv[-1])
        for prefix, answer in self.answers.items():
            if key.startswith(prefix):
                return answer
        return ""


async def test_lvmthin_commands() -> None:
    storage = fleecing_storage(storages(), "thin")  # type: ignore[arg-type]
    runner = RecordingRunner({"lvs --noheadings --units b": "  107374182400;12.50;passdown\n"},
                             missing={"pve/vm-100-fleece-0", "pve/vm-100-fleece-1"})
    plan = await plan_fleecing(storage, [32 * GiB], runner)
    assert plan.format == "raw" and plan.probe.thin and plan.probe.discard
    assert plan.probe.free_bytes == 93952409600
    assert runner.calls[0] == ["lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ";",
                               "-o", "lv_size,data_percent,discards", "pve/data"]
    image = await next_free_image(plan, 100, 32 * GiB + 512, set(), runner)
    assert (image.name, image.path, image.volume) == ("vm-100-fleece-0", "/dev/pve/vm-100-fleece-0",
                                                      "pve/vm-100-fleece-0")
    assert image.alloc_size == 32 * GiB + MiB and image.size == 32 * GiB + 512
    await create_image(image, plan, runner)
    assert runner.calls[-1] == ["lvcreate", "-aly", "-V", f"{(32 * GiB + MiB) // 1024}k", "--name",
                                "vm-100-fleece-0", "--thinpool", "pve/data"]
    await free_image(image, runner)
    assert runner.calls[-1] == ["lvremove", "-f", "pve/vm-100-fleece-0"]
    n = len(runner.calls)
    await free_image(image, runner)  # gone already: only looked up
    assert runner.calls[n:] == [["lvs", "--noheadings", "-o", "lv_name", "pve/vm-100-fleece-0"]]


async def test_zfspool_commands() -> None:
    storage = fleecing_storage(storages(), "tank")  # type: ignore[arg-type]
    runner = RecordingRunner({"zfs get": "53687091200\n1073741824\n"}, missing={"tank/vms/vm-100-fleece-0"})
    plan = await plan_fleecing(storage, [8 * GiB], runner)
    assert runner.calls[0] == ["zfs", "get", "-Hp", "-o", "value", "available,used", "tank/vms"]
    assert plan.cluster_size == 64 * 1024 and plan.probe.thin
    image = await next_free_image(plan, 100, 8 * GiB, set(), runner)
    assert image.path == "/dev/zvol/tank/vms/vm-100-fleece-0"
    await create_image(image, plan, runner)
    assert runner.calls[-1] == ["zfs", "create", "-s", "-b", "64k", "-V", f"{8 * GiB // 1024}k",
                                "tank/vms/vm-100-fleece-0"]
    await free_image(image, runner)
    assert runner.calls[-1] == ["zfs", "destroy", "-r", "tank/vms/vm-100-fleece-0"]


async def test_thick_zvol_needs_the_full_size() -> None:
    cfg = "zfspool: z\n\tpool rpool/data\n\tcontent images\n"
    storage = fleecing_storage(parse_storage_cfg(cfg, "s.cfg"), "z")
    runner = RecordingRunner({"zfs get": f"{4 * GiB}\n0\n"})
    with pytest.raises(FleecingSpaceError, match="allocates images in full"):
        await plan_fleecing(storage, [8 * GiB], runner)


async def test_plan_warnings_are_left_to_the_caller_to_log_once(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The run logs the plan's warnings in the task log; plan_fleecing printing them too made them appear twice."""
    import fleecing.storage

    async def fake_probe(storage: object, runner: object) -> SpaceProbe:
        return probe(10 << 30, thin=True, discard=False)

    monkeypatch.setattr(fleecing.storage, "probe_storage", fake_probe)
    with caplog.at_level("DEBUG"):
        plan = await plan_fleecing(dir_storage(Path("/srv/f")), [2 << 30])
    assert "does not support discard" in plan.warnings[0]
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
