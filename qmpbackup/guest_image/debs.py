"""Debian packages for a guest image: candidate versions, downloads, file extraction.

Why apt and not a pinned list: the images follow the host's Debian point releases (security
fixes in the guest kernel and libraries) without anyone editing version numbers.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

APT_LISTS = Path("/var/lib/apt/lists")
Logger = Callable[[str], None]
# packages that hold shared libraries (zlib1g is the one without the lib prefix)
LIBRARY_PREFIXES = ("lib", "zlib1g")


class BuildError(Exception):
    """One-line reason a guest image could not be built."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def run(cmd: list[str], *, timeout: float = 300, cwd: Path | None = None) -> str:
    """stdout of ``cmd``; a failure is a BuildError naming the command and its last stderr line."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                              check=False)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(cmd[:3])} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"{' '.join(cmd[:3])} failed: {last}")
    return proc.stdout


def apt_records(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Candidate records (``apt-cache show --no-all-versions``) by package name."""
    wanted = list(names)
    out = run(["apt-cache", "show", "--no-all-versions", *wanted])
    records: dict[str, dict[str, str]] = {}
    for block in out.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    missing = [n for n in wanted if n not in records]
    if missing:
        raise BuildError(f"no apt candidate for {', '.join(missing)}")
    return records


def depends(record: dict[str, str]) -> list[str]:
    """First alternative of every Depends and Pre-Depends entry, without versions or arch qualifiers."""
    result = []
    for field in ("Pre-Depends", "Depends"):
        for entry in record.get(field, "").split(","):
            first = entry.split("|")[0].strip()
            name = re.split(r"[\s(:]", first, maxsplit=1)[0]
            if name:
                result.append(name)
    return result


def resolve(roots: Iterable[str], follow: Iterable[str], meta_kernel: str | None = None) -> list[Package]:
    """Candidate versions of ``roots`` plus the library packages the ``follow`` packages depend on.

    Only ``lib*`` (and ``gcc-*``) dependencies are followed, so init-system glue is never
    fetched; the ELF closure later picks the files. ``meta_kernel`` (e.g.
    ``linux-image-cloud-amd64``) is replaced by the versioned kernel package it depends on.
    """
    names = list(roots)
    chosen: dict[str, dict[str, str]] = {}
    if meta_kernel is not None:
        meta = apt_records([meta_kernel])[meta_kernel]
        kernel = [d for d in depends(meta) if d.startswith("linux-image-")]
        if not kernel:
            raise BuildError(f"{meta_kernel} depends on no linux-image package")
        chosen[meta_kernel] = meta
        names.insert(0, kernel[0])
    records = apt_records(names)
    chosen.update(records)
    wanted = list(dict.fromkeys([*names]))
    follow_set = set(follow)
    frontier = [d for n in names if n in follow_set for d in depends(records[n])
                if d.startswith(LIBRARY_PREFIXES) and d not in chosen]
    while frontier:
        new = apt_records(sorted(set(frontier)))
        chosen.update(new)
        wanted += [n for n in new if n not in wanted]
        frontier = sorted({d for n, r in new.items() if n.startswith(LIBRARY_PREFIXES)
                           for d in depends(r) if d not in chosen
                           and d.startswith((*LIBRARY_PREFIXES, "gcc-"))})
    return [Package(n, chosen[n]["Version"], chosen[n].get("Architecture", "amd64")) for n in wanted]


def apt_lists_stamp() -> str:
    """Changes whenever apt update or the apt configuration could change a candidate."""
    items = []
    for base in (APT_LISTS, Path("/etc/apt")):
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file() and "partial" not in path.parts and path.name != "lock":
                    st = path.stat()
                    items.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def have_apt_lists() -> bool:
    return APT_LISTS.is_dir() and any(p.name.endswith(("_Packages", "_Packages.lz4", "_Packages.xz",
                                                       "_Packages.gz")) for p in APT_LISTS.iterdir())


def download(packages: list[Package], debs: Path, log: Logger) -> dict[str, Path]:
    """The .deb of every package, from the deb cache or ``apt-get download``."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (debs / p.deb_name).is_file()]
    if missing:
        log(f"downloading {len(missing)} packages")
        with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
            # as root, apt would hand the download to _apt, which cannot write into our folder
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            run(["apt-get", "-q", *sandbox, "download", *[f"{p.name}={p.version}" for p in missing]],
                cwd=Path(tmp), timeout=900)
            for p in missing:
                got = Path(tmp) / p.deb_name
                if not got.is_file():
                    raise BuildError(f"apt-get download did not produce {p.deb_name}")
                got.replace(debs / p.deb_name)
    return {p.name: debs / p.deb_name for p in packages}


def extract(deb: Path, dest: Path, want: re.Pattern[str]) -> list[str]:
    """Extract members of a .deb's data tarball whose path matches ``want``."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    names = []
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not want.search(name) or not (member.isfile() or member.issym()):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.issym():
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(member.linkname, target)
            else:
                src = tar.extractfile(member)
                assert src is not None
                target.write_bytes(src.read())
                target.chmod(member.mode & 0o777)
            names.append(name)
    if proc.wait() != 0:
        raise BuildError(f"dpkg-deb --fsys-tarfile {deb.name} failed")
    return names

