"""The list/extract service inside the helper VM (standard library only; runs as root there).

Paths are ``<serial>/<volume>/<path inside the file system>``: the host names each attached
device by a short serial (``d0``, ``d1`` …) and maps it to the archive's device name itself,
so no archive-chosen name ever reaches a command line here. Volumes are ``partN``, ``disk``
(a file system on the whole device) and ``lv/<vg>-<lv>``. Every mount is read-only and skips
journal replay, so a backup's file system is never changed, not even in the helper's memory.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from qmpbackup.file_restore.wire import (
    DATA, END, HEAD, MAX_REQUEST, WireError, frame, json_frame, parse_request,
)

CHUNK = 1 << 20
MOUNT_OPTIONS = {"ext2": "ro,noload", "ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery",
                 "btrfs": "ro,rescue=nologreplay", "vfat": "ro", "iso9660": "ro"}
LVM = "/sbin/lvm"


class ServiceError(Exception):
    """A request that cannot be answered; the message names the path."""

    def __init__(self, message: str, code: str = "EINVAL") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Volume:
    name: str
    device: str
    fstype: str | None
    size: int
    error: str | None = None
    mountpoint: str | None = None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


class Disks:
    """The attached devices, their volumes, and the read-only mounts made on demand."""

    def __init__(self) -> None:
        self._lvm_done = False
        self._lvm_error = ""
        self._volumes: dict[str, dict[str, Volume]] = {}

    def drives(self) -> dict[str, tuple[str, int]]:
        """serial -> (kernel name, size in bytes)."""
        found = {}
        for name in sorted(os.listdir("/sys/block")):
            try:
                serial = _read(f"/sys/block/{name}/serial")
            except OSError:
                continue
            if serial:
                found[serial] = (name, int(_read(f"/sys/block/{name}/size")) * 512)
        return found

    def volumes(self, serial: str) -> dict[str, Volume]:
        if serial in self._volumes:
            return self._volumes[serial]
        drives = self.drives()
        if serial not in drives:
            raise ServiceError(f"{serial}: no such drive", "ENOENT")
        kname, size = drives[serial]
        parts = sorted((p for p in os.listdir(f"/sys/block/{kname}") if p.startswith(kname)),
                       key=lambda p: int(p[len(kname):].lstrip("p") or 0))
        found: dict[str, Volume] = {}
        if parts:
            for p in parts:
                number = p[len(kname):].lstrip("p")
                psize = int(_read(f"/sys/block/{kname}/{p}/size")) * 512
                found[f"part{number}"] = self._volume(f"part{number}", f"/dev/{p}", psize)
        else:
            found["disk"] = self._volume("disk", f"/dev/{kname}", size)
        for lv in self._logical_volumes(kname):
            found[lv.name] = lv
        self._volumes[serial] = found
        return found

    def _volume(self, name: str, device: str, size: int) -> Volume:
        fstype = _fstype(device)
        vol = Volume(name, device, fstype, size)
        if fstype is None:
            vol.error = "no file system found"
        elif fstype == "LVM2_member":
            vol.error = "LVM physical volume (its logical volumes are listed under lv/)"
        elif fstype not in MOUNT_OPTIONS and fstype != "ntfs":
            vol.error = f"unsupported file system {fstype}"
        return vol

    def _logical_volumes(self, kname: str) -> list[Volume]:
        if not os.path.exists(LVM):
            return []
        if not self._lvm_done:
            self._lvm_done = True
            os.makedirs("/run/lvm", exist_ok=True)
            res = _run([LVM, "vgchange", "-ay", "--sysinit", "--ignorelockingfailure"], timeout=120)
            self._lvm_error = (res.stderr.strip().splitlines() or [""])[-1]
        res = _run([LVM, "lvs", "--readonly", "--noheadings", "--separator", "|", "--units", "b",
                    "--nosuffix", "-o", "vg_name,lv_name,lv_size,devices,lv_path"])
        result = []
        for line in res.stdout.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) != 5:
                continue
            vg, lv, size, devices, path = fields
            first = devices.split(",")[0].split("(")[0]
            if os.path.basename(first).rstrip("0123456789").rstrip("p") != kname:
                continue
            device = path if os.path.exists(path) else f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"
            if not os.path.exists(device):
                result.append(Volume(f"lv/{vg}-{lv}", device, None, int(float(size or 0)),
                                     f"not activated: {self._lvm_error or 'no device node'}"))
                continue
            result.append(self._volume(f"lv/{vg}-{lv}", device, int(float(size or 0))))
        return result

    def mount(self, serial: str, vol: Volume) -> str:
        if vol.mountpoint is not None:
            return vol.mountpoint
        if vol.error is not None:
            raise ServiceError(f"{serial}/{vol.name}: {vol.error}", "ENOFS")
        target = f"/mnt/{serial}/{vol.name.replace('/', '_')}"
        os.makedirs(target, exist_ok=True)
        if vol.fstype == "ntfs":
            cmd = ["/bin/ntfs-3g", "-o", "ro", vol.device, target]
        else:
            assert vol.fstype is not None
            cmd = ["mount", "-t", vol.fstype, "-o", MOUNT_OPTIONS[vol.fstype], vol.device, target]
        res = _run(cmd)
        if res.returncode != 0:
            reason = (res.stderr.strip().splitlines() or ["mount failed"])[-1]
            vol.error = f"cannot mount {vol.fstype}: {reason}"
            raise ServiceError(f"{serial}/{vol.name}: {vol.error}", "ENOFS")
        vol.mountpoint = target
        return target


def _fstype(device: str) -> str | None:
    res = _run(["/sbin/blkid", "-p", "-o", "export", device])
    for line in res.stdout.splitlines():
        if line.startswith("TYPE="):
            return line[5:]
    return None


def _split(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ServiceError(f"{path}: '..' is not allowed in paths", "EINVAL")
    return parts


def _entry(name: str, full: str) -> dict[str, Any]:
    st = os.lstat(full)
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
    entry: dict[str, Any] = {"name": name, "type": kind, "size": st.st_size, "mtime": int(st.st_mtime),
                             "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if kind == "symlink":
        entry["target"] = os.readlink(full)
    return entry


class Service:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.disks = Disks()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a virtio port takes what fits in its buffers: write the rest again
            written = self.out.write(view)
            view = view[written or 0:]

    def handle(self, req: dict[str, Any]) -> None:
        op = req["op"]
        if op == "hello":
            drives = {s: size for s, (_, size) in self.disks.drives().items()}
            self.send(json_frame(END, {"ok": True, "drives": drives}))
        elif op == "list":
            self.send(json_frame(HEAD, {"entries": self.list(str(req.get("path", "")))}))
            self.send(json_frame(END, {"ok": True}))
        elif op == "extract":
            self.extract(str(req.get("path", "")), str(req.get("format", "plain")))
            self.send(json_frame(END, {"ok": True}))
        else:
            raise ServiceError(f"unknown operation {op!r}")

    def _resolve(self, path: str) -> tuple[list[str], str | None]:
        """Split ``path``; the file-system path when it reaches into a mounted volume."""
        parts = _split(path)
        if len(parts) < 2:
            return parts, None
        serial = parts[0]
        vols = self.disks.volumes(serial)
        name, rest = parts[1], parts[2:]
        if name == "lv" and rest:
            name, rest = f"lv/{rest[0]}", rest[1:]
        if name not in vols:
            if name == "lv":
                return parts, None
            raise ServiceError(f"{path}: no such volume", "ENOENT")
        root = self.disks.mount(serial, vols[name])
        return parts, os.path.join(root, *rest)

    def list(self, path: str) -> list[dict[str, Any]]:
        parts, fs_path = self._resolve(path)
        if not parts:
            return [{"name": s, "type": "drive", "size": size} for s, (_, size) in self.disks.drives().items()]
        if fs_path is None:
            vols = self.disks.volumes(parts[0])
            if len(parts) == 2:  # drive/lv
                names = [v for v in vols if v.startswith("lv/")]
                if not names:
                    raise ServiceError(f"{path}: no logical volumes", "ENOENT")
                return [self._vol_entry(vols[v], v[3:]) for v in names]
            top = [self._vol_entry(v, n) for n, v in vols.items() if not n.startswith("lv/")]
            if any(n.startswith("lv/") for n in vols):
                top.append({"name": "lv", "type": "dir", "size": 0})
            return top
        try:
            st = os.lstat(fs_path)
        except FileNotFoundError:
            raise ServiceError(f"{path}: no such file or directory", "ENOENT") from None
        if not stat.S_ISDIR(st.st_mode):
            return [_entry(parts[-1], fs_path)]
        try:
            names = sorted(os.listdir(fs_path))
        except OSError as exc:
            raise ServiceError(f"{path}: {exc.strerror}", errno.errorcode.get(exc.errno or 0, "EIO")) from None
        return [_entry(n, os.path.join(fs_path, n)) for n in names]

    @staticmethod
    def _vol_entry(vol: Volume, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "type": "volume", "size": vol.size, "fstype": vol.fstype}
        if vol.error is not None:
            entry["error"] = vol.error
        return entry

    def extract(self, path: str, fmt: str) -> None:
        parts, fs_path = self._resolve(path)
        if fs_path is None:
            raise ServiceError(f"{path}: give a path inside a volume (drive/volume/...)", "EINVAL")
        try:
            st = os.lstat(fs_path)
        except FileNotFoundError:
            raise ServiceError(f"{path}: no such file or directory", "ENOENT") from None
        name = parts[-1] if len(parts) > 2 else parts[1].replace("/", "_")
        if fmt == "auto":
            fmt = "plain" if stat.S_ISREG(st.st_mode) else "tar"
        if fmt == "plain":
            if not stat.S_ISREG(st.st_mode):
                raise ServiceError(f"{path}: not a regular file; use --format tar or zip", "EISDIR")
            self.send(json_frame(HEAD, {"type": "file", "size": st.st_size}))
            with open(fs_path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.send(frame(DATA, chunk))
            return
        self.send(json_frame(HEAD, {"type": "dir" if stat.S_ISDIR(st.st_mode) else "file", "format": fmt}))
        sink = _DataSink(self.send)
        if fmt == "tar":
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                tar.add(fs_path, arcname=name, recursive=True)
        elif fmt == "zip":
            with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:  # type: ignore[arg-type, unused-ignore]
                _zip_tree(zf, fs_path, name)
        else:
            raise ServiceError(f"unknown format {fmt!r} (tar, zip, plain, auto)")
        sink.flush()


class _DataSink:
    """A write-only, unseekable stream that leaves as D frames of up to CHUNK bytes."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= CHUNK:
            self._send(frame(DATA, bytes(self._buf[:CHUNK])))
            del self._buf[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._send(frame(DATA, bytes(self._buf)))
            self._buf.clear()

    def close(self) -> None:
        self.flush()


def _zip_tree(zf: zipfile.ZipFile, top: str, arcname: str) -> None:
    """Zip entries keep modes in the external attributes; symlinks are stored as links."""
    stack = [(top, arcname)]
    while stack:
        path, name = stack.pop()
        st = os.lstat(path)
        info = zipfile.ZipInfo(name + ("/" if stat.S_ISDIR(st.st_mode) else ""),
                               time.localtime(max(st.st_mtime, 315532800))[:6])
        info.external_attr = (st.st_mode & 0xFFFF) << 16
        if stat.S_ISLNK(st.st_mode):
            zf.writestr(info, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            zf.writestr(info, b"")
            for child in sorted(os.listdir(path), reverse=True):
                stack.append((os.path.join(path, child), f"{name}/{child}"))
        elif stat.S_ISREG(st.st_mode):
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)


def serve(port: str) -> None:
    fd = os.open(port, os.O_RDWR)
    out = os.fdopen(fd, "wb", buffering=0, closefd=False)
    service = Service(out)
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # the host is not connected: wait for it
            time.sleep(0.2)
            continue
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            _answer(service, line)
        if len(pending) > MAX_REQUEST:
            pending = b""
            service.send(json_frame(END, {"error": "request too long", "code": "EINVAL"}))


def _answer(service: Service, line: bytes) -> None:
    try:
        service.handle(parse_request(line))
    except ServiceError as exc:
        service.send(json_frame(END, {"error": str(exc), "code": exc.code}))
    except (WireError, OSError, ValueError, subprocess.SubprocessError) as exc:
        service.send(json_frame(END, {"error": f"helper: {exc}", "code": "EIO"}))


if __name__ == "__main__":
    serve(sys.argv[1])
