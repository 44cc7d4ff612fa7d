"""Cached, locked builds of a guest image: rebuilt only when a package version or the recipe changes.

Layout of the cache folder: ``debs/`` (downloaded packages), ``resolved.json`` (the last
resolution, valid while the apt lists and the recipe are unchanged) and one folder per image
key holding the image files and ``manifest.json``. Builds happen in a hidden folder and are
renamed into place, so a killed build never leaves a half image under a key.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

from qmpbackup.guest_image.debs import (
    BuildError, Logger, Package, apt_lists_stamp, download, have_apt_lists, run,
)


class Recipe(Protocol):
    """What one kind of guest image is made of."""

    recipe_sha: str  # changes whenever the recipe's own code or files change

    def resolve(self) -> list[Package]: ...

    def build(self, packages: list[Package], debs: dict[str, Path], work: Path,
              dest: Path) -> dict[str, object]: ...


def sources_sha(*files: Path) -> str:
    """A recipe's ``recipe_sha``: the hash of the files that decide what its image holds."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _resolve_cached(out: Path, recipe: Recipe, log: Logger) -> list[Package]:
    cache = out / "resolved.json"
    if not have_apt_lists():
        if os.geteuid() != 0:
            raise BuildError("apt package lists are missing; run 'apt-get update' as root")
        log("apt package lists missing, running apt-get update")
        run(["apt-get", "update", "-qq"], timeout=600)
    stamp = apt_lists_stamp()
    try:
        data = json.loads(cache.read_text())
        if data["stamp"] == stamp and data["script"] == recipe.recipe_sha:
            return [Package(**p) for p in data["packages"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    packages = recipe.resolve()
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "script": recipe.recipe_sha,
                               "packages": [p.__dict__ for p in packages]}, indent=1))
    tmp.replace(cache)
    return packages


def _key(packages: list[Package], recipe_sha: str) -> str:
    text = "\n".join(f"{p.name}={p.version}:{p.arch}" for p in sorted(packages, key=lambda p: p.name))
    return hashlib.sha256(f"{text}\nscript={recipe_sha}".encode()).hexdigest()[:16]


def _newest_image(out: Path, recipe_sha: str) -> Path | None:
    """Most recent complete image of this very recipe (the offline fallback)."""
    best: tuple[float, Path] | None = None
    for manifest in out.glob("*/manifest.json"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if data.get("script_sha256") == recipe_sha:
            mtime = manifest.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, manifest.parent)
    return best[1] if best else None


def ensure_image(out: Path, recipe: Recipe, log: Logger, force: bool = False) -> Path:
    """The image folder: cached, or built; offline, the newest image of this recipe."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                return _resolve_and_build(out, recipe, log, force)
            except BuildError as exc:
                if os.geteuid() != 0:
                    raise
                # stale lists: a candidate is gone or its .deb left the mirror
                log(f"{exc}; running apt-get update and retrying once")
                (out / "resolved.json").unlink(missing_ok=True)
                run(["apt-get", "update", "-qq"], timeout=600)
                return _resolve_and_build(out, recipe, log, force)
        except BuildError as exc:
            fallback = _newest_image(out, recipe.recipe_sha)
            if fallback is None:
                raise
            log(f"{exc}; using cached image {fallback.name}")
            return fallback


def _resolve_and_build(out: Path, recipe: Recipe, log: Logger, force: bool) -> Path:
    packages = _resolve_cached(out, recipe, log)
    key = _key(packages, recipe.recipe_sha)
    image = out / key
    if (image / "manifest.json").is_file() and not force:
        return image
    started = time.monotonic()
    for stale in [*out.glob(".build-*"), *(out / "debs").glob(".dl-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (we hold the lock)
    debs = download(packages, out / "debs", log)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        work, dest = Path(tmp) / "work", Path(tmp) / key
        work.mkdir()
        dest.mkdir()
        facts = recipe.build(packages, debs, work, dest)
        manifest = {
            "key": key,
            "script_sha256": recipe.recipe_sha,
            "packages": {p.name: p.version for p in packages},
            **facts,
            "build_seconds": round(time.monotonic() - started, 2),
        }
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if image.exists():
            shutil.rmtree(image)
        dest.rename(image)
    log(f"built {image} in {time.monotonic() - started:.1f} s")
    _prune_images(out, keep=image, log=log)
    return image


def _prune_images(out: Path, keep: Path, log: Logger, others: int = 2) -> None:
    """Keep the new image and the ``others`` most recent ones (an older checkout may want them)."""
    images = sorted((p for p in out.glob("*/manifest.json") if p.parent != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in images[others:]:
        shutil.rmtree(manifest.parent, ignore_errors=True)
        log(f"removed old image {manifest.parent.name}")
