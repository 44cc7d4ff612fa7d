"""The helper VM's image: a Debian cloud kernel and an initramfs with our list/extract service.

What is in it and why: busybox (shell, mount), Python 3.11 (the service; tarfile and zipfile
stream archives with modes, owners, times and symlinks), util-linux's ``blkid`` (file-system
and LVM detection that busybox's lacks), lvm2 (logical volumes) and ntfs-3g (NTFS through
FUSE), with the kernel modules for xfs, btrfs, vfat, iso9660, device-mapper and FUSE (ext4 is
built into the kernel). No file-system tools: the helper only mounts read-only.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import qmpbackup.file_restore as package
from qmpbackup.guest_image.cache import ensure_image, sources_sha
from qmpbackup.guest_image.cpio import Cpio
from qmpbackup.guest_image.debs import LIBRARY_PREFIXES, BuildError, Logger, Package, extract, resolve, run
from qmpbackup.guest_image.elf import library_closure

KERNEL_META = "linux-image-cloud-amd64"
PYTHON = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
TOOLS = ("busybox-static", "util-linux", "lvm2", "dmsetup", "ntfs-3g")
MULTIARCH = "x86_64-linux-gnu"
# loaded with their dependencies (read from each module's .modinfo), in dependency order
MODULES = (
    "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_console",
    "xfs", "btrfs", "dm-mod", "fuse", "vfat", "nls_cp437", "nls_utf8", "nls_iso8859-1", "isofs",
)
BINARIES = ("usr/bin/python3.11", "sbin/blkid", "sbin/lvm", "sbin/dmsetup", "bin/ntfs-3g")
# stdlib folders the service never imports (size and unpack time of the initramfs)
PY_SKIP = re.compile(r"^usr/lib/python3\.11/(test|idlelib|tkinter|lib2to3|ensurepip|pydoc_data|"
                     r"turtledemo|distutils|unittest|asyncio|email|http|xmlrpc|wsgiref|sqlite3|"
                     r"curses|dbm|multiprocessing|concurrent|xml|venv|config-3\.11[^/]*|"
                     r"site-packages|dist-packages)/")
PY_DYNLOAD = ("_json", "_typing", "_contextvars", "_queue", "resource", "mmap")
SERVICE_FILES = ("__init__.py", "wire.py", "guest_service.py")
LVM_CONF = ("devices { obtain_device_list_from_udev = 0 }\n"
            "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n"
            "global { use_lvmetad = 0 locking_type = 0 }\n")
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "qmpbackup-file-restore\n",
    "etc/lvm/lvm.conf": LVM_CONF,
}
_PACKAGE_DIR = Path(package.__file__).parent


def default_cache_dir(state_dir: Path) -> Path:
    """Where images live: beside the journals, or in the user's cache when the state dir is not ours."""
    if os.access(state_dir if state_dir.exists() else state_dir.parent, os.W_OK):
        return state_dir / "file-restore-image"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qmpbackup" / "file-restore-image"


class HelperImageRecipe:
    """The ``Recipe`` of qmpbackup.guest_image.cache for the helper VM."""

    recipe_sha = sources_sha(Path(__file__), _PACKAGE_DIR / "guest_init.sh",
                             *(_PACKAGE_DIR / f for f in SERVICE_FILES),
                             *sorted((_PACKAGE_DIR.parent / "guest_image").glob("*.py")))

    def resolve(self) -> list[Package]:
        return resolve([*TOOLS, *PYTHON], follow=["python3.11-minimal", "util-linux", "lvm2",
                                                  "dmsetup", "ntfs-3g"], meta_kernel=KERNEL_META)

    def build(self, packages: list[Package], debs: dict[str, Path], work: Path,
              dest: Path) -> dict[str, object]:
        kernel_pkg = next(p for p in packages if p.name.startswith("linux-image-"))
        extract(debs[kernel_pkg.name], work, re.compile(r"^boot/vmlinuz-|\.ko$"))
        extract(debs["busybox-static"], work, re.compile(r"^bin/busybox$"))
        extract(debs["util-linux"], work, re.compile(r"^sbin/blkid$"))
        extract(debs["lvm2"], work, re.compile(r"^sbin/lvm$"))
        extract(debs["dmsetup"], work, re.compile(r"^sbin/dmsetup$"))
        extract(debs["ntfs-3g"], work, re.compile(r"^bin/ntfs-3g$"))
        extract(debs["python3.11-minimal"], work, re.compile(r"^usr/bin/python3\.11$"))
        for name in PYTHON[1:]:
            extract(debs[name], work, re.compile(r"^usr/lib/python3\.11/"))
        for p in packages:
            if p.name.startswith(LIBRARY_PREFIXES) and p.name not in PYTHON:
                extract(debs[p.name], work, re.compile(r"(^|/)lib/(x86_64-linux-gnu/)?[^/]+\.so[.0-9]*$"))
        vmlinuz = sorted((work / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise BuildError(f"{kernel_pkg.name} has no boot/vmlinuz-*")
        order = module_order(MODULES, {p.stem: p for p in (work / "lib" / "modules").rglob("*.ko")})

        dynload = work / "usr/lib/python3.11/lib-dynload"
        ext_modules = [m for m in sorted(dynload.glob("*.so")) if m.name.split(".")[0] in PY_DYNLOAD]
        binaries = [work / b for b in BINARIES]
        libdirs = [work / "lib" / MULTIARCH, work / "usr" / "lib" / MULTIARCH]
        libs = library_closure([*binaries, *ext_modules], libdirs)
        busybox = work / "bin" / "busybox"
        applets = run([str(busybox), "--list-full"]).split()

        cpio = Cpio()
        for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "sbin", "usr/bin", "usr/sbin",
                  f"lib/{MULTIARCH}", "lib64", "etc"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        own = {b.rsplit("/", 1)[-1] for b in BINARIES}
        for applet in sorted(applets):
            if applet not in ("bin/busybox", "sbin/init", "linuxrc") and applet.rsplit("/", 1)[-1] not in own:
                cpio.symlink(applet, "/bin/busybox")
        for b in binaries:
            cpio.file(str(b.relative_to(work)), b.read_bytes(), 0o755)
        for soname in sorted(libs):
            cpio.file(f"lib/{MULTIARCH}/{soname}", libs[soname].read_bytes(), 0o755)
        cpio.symlink("lib64/ld-linux-x86-64.so.2", f"/lib/{MULTIARCH}/ld-linux-x86-64.so.2")
        cpio.dir("lib/modules")
        for name, path in order:
            cpio.file(f"lib/modules/{name}.ko", path.read_bytes())
        cpio.file("lib/modules/load-order", ("\n".join(n for n, _ in order) + "\n").encode())
        stdlib = _compiled_stdlib(work)
        for rel in sorted(stdlib):
            cpio.file(rel, stdlib[rel])
        for m in ext_modules:
            cpio.file(str(m.relative_to(work)), m.read_bytes(), 0o755)
        cpio.file("usr/lib/qmpbackup/qmpbackup/__init__.py", b"")
        for name in SERVICE_FILES:
            data = b"" if name == "__init__.py" else (_PACKAGE_DIR / name).read_bytes()
            cpio.file(f"usr/lib/qmpbackup/qmpbackup/file_restore/{name}", data)
        for etc_name, text in ETC_FILES.items():
            cpio.file(etc_name, text.encode())
        cpio.file("init", (_PACKAGE_DIR / "guest_init.sh").read_bytes(), 0o755)
        raw = cpio.finish()
        initrd = gzip.compress(raw, compresslevel=6, mtime=0)
        (dest / "initramfs.cpio.gz").write_bytes(initrd)
        shutil.copyfile(vmlinuz[0], dest / "vmlinuz")
        return {"kernel_release": vmlinuz[0].name.removeprefix("vmlinuz-"),
                "modules": [n for n, _ in order], "libraries": sorted(libs),
                "initramfs_bytes": len(initrd), "initramfs_raw_bytes": len(raw)}


def _compiled_stdlib(work: Path) -> dict[str, bytes]:
    """The stdlib's sources and bytecode (compiled here once, not at every helper start under TCG)."""
    root = work / "usr/lib/python3.11"
    files = {str(p.relative_to(work)): p for p in root.rglob("*.py")
             if not PY_SKIP.match(str(p.relative_to(work)))}
    python = shutil.which("python3.11")
    if python is not None:
        # unchecked-hash pycs: valid whatever the files' times are in the cpio (0)
        subprocess.run([python, "-I", "-m", "compileall", "-q", "-j", "0",
                        "--invalidation-mode", "unchecked-hash", "-x", PY_SKIP.pattern.replace(
                            "^usr/lib/python3\\.11/", "/usr/lib/python3\\.11/"),
                        str(root)], check=False, capture_output=True, timeout=600)
    out = {rel: path.read_bytes() for rel, path in files.items()}
    for rel in list(files):
        for pyc in (work / rel).parent.glob(f"__pycache__/{Path(rel).stem}.cpython-311*.pyc"):
            out[str(pyc.relative_to(work))] = pyc.read_bytes()
    return out


def module_order(wanted: tuple[str, ...], available: dict[str, Path]) -> list[tuple[str, Path]]:
    """``wanted`` kernel modules and what they depend on, each after its dependencies."""
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name if name in available else name.replace("_", "-")
        if key not in available:
            key = name.replace("-", "_")
        if key in seen:
            return
        if key not in available:
            raise BuildError(f"kernel module {name} (for {' > '.join(chain) or 'the helper'}) is missing")
        seen.add(key)
        data = available[key].read_bytes()
        found = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
        for dep in (found.group(1).decode().split(",") if found else []):
            if dep:
                visit(dep, (*chain, key))
        order.append((key, available[key]))

    for name in wanted:
        visit(name, ())
    return order


def ensure_helper_image(cache_dir: Path, log: Logger | None = None, force: bool = False) -> Path:
    """The helper image folder (``vmlinuz``, ``initramfs.cpio.gz``), built when missing or stale."""
    return ensure_image(cache_dir, HelperImageRecipe(), log or _stderr, force)


def _stderr(msg: str) -> None:
    print(f"file-restore: {msg}", file=sys.stderr)
