"""Safe extraction of tar and zip archives: nothing may land outside the target folder.

Absolute paths, ``..`` escapes, escaping links, device/fifo members, members whose names clash (a link or folder
where a file is) and oversized contents raise ``UnsafeArchiveError``.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import IO, Iterable

from duplus.errors import UnsafeArchiveError

DEFAULT_MAX_BYTES = 1 << 40  # 1 TiB: above any dataset of the paper, below a zip bomb's claim
CHUNK = 1 << 20


def _clean_name(archive: Path, name: str) -> str:
    """The member's relative path, or ``UnsafeArchiveError`` if it is absolute or climbs out."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member '{name!r}' has a NUL byte in its name")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member '{name}' has an absolute path")
    normal = posixpath.normpath(unified)
    if normal == ".." or normal.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: member '{name}' escapes the target folder with '..'")
    return "" if normal == "." else normal


def _check_link(archive: Path, name: str, target: str, hard: bool) -> str:
    """Resolve a link target inside the archive (relative to the member's folder, or the root for hard links)."""
    unified = target.replace("\\", "/")
    kind = "hard link" if hard else "symlink"
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member '{name}' is a {kind} to the absolute path '{target}'")
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, unified))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: member '{name}' is a {kind} to '{target}', outside the target folder")
    return resolved


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _copy_limited(source: IO[bytes], destination: Path, archive: Path, name: str, budget: list[int]) -> None:
    # O_NOFOLLOW: never write through a link standing at the member's name (_file_target removes it).
    descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                break
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UnsafeArchiveError(f"{archive}: member '{name}' exceeds the size limit of the archive's "
                                         f"contents (zip bomb?)")
            handle.write(chunk)


def _target(root: Path, archive: Path, name: str) -> Path:
    path = root / name
    # A symlinked folder extracted earlier must not redirect a later member outside the root.
    if not _inside(root, path.parent):
        raise UnsafeArchiveError(f"{archive}: member '{name}' would be written through a link outside the target")
    return path


def _file_target(root: Path, archive: Path, name: str) -> Path:
    """Where a regular member goes; a link already at that name is replaced, never written through."""
    path = _target(root, archive, name)
    if path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


MAX_LINK_DEPTH = 40  # as the kernel's ELOOP limit


def _resolve(archive: Path, links: dict[str, str], path: str, depth: int = 0) -> str | None:
    """Where ``path`` (relative to the root) lands once the archive's earlier symlinks are followed.

    Component by component, as the operating system walks it: ``a/b/..`` is ``a`` only if ``b``
    is not a link. ``None`` when the walk climbs above the root.
    """
    if depth > MAX_LINK_DEPTH:
        raise UnsafeArchiveError(f"{archive}: symlinks nest deeper than {MAX_LINK_DEPTH} levels around '{path}'")
    current: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return None
            current.pop()
            continue
        candidate = "/".join([*current, part])
        if candidate in links:
            landed = _resolve(archive, links, posixpath.join("/".join(current), links[candidate]), depth + 1)
            if landed is None:
                return None
            current = landed.split("/") if landed else []
        else:
            current.append(part)
    return "/".join(current)


def _kind(member: tarfile.TarInfo) -> str:
    # A hard link is extracted as a copy, so on disk it is a file like any other.
    return "folder" if member.isdir() else "symlink" if member.issym() else "file"


# (earlier, later) kinds of two members at one place that extract cleanly, as tar does: the later
# member replaces the earlier one, or a folder is listed twice. Any other pair (a link or a folder
# where a file is, a file where a folder is) cannot be extracted without deleting what an earlier
# member wrote, so the archive is refused.
_REPLACEABLE = {("file", "file"), ("symlink", "file"), ("symlink", "symlink"), ("folder", "folder")}


def _claim(archive: Path, claimed: dict[str, str], member: str, kind: str, parent: str, location: str) -> None:
    """Record the ``kind`` that ``member`` puts at ``location`` (its folders too), refusing a clash with an earlier one."""
    folders = parent.split("/") if parent else []
    for depth in range(1, len(folders) + 1):
        folder = "/".join(folders[:depth])
        if claimed.setdefault(folder, "folder") != "folder":
            raise UnsafeArchiveError(f"{archive}: member '{member}' needs the folder '{folder}', which an "
                                     f"earlier member of the archive holds as a {claimed[folder]}")
    earlier = claimed.get(location)
    if earlier is not None and (earlier, kind) not in _REPLACEABLE:
        raise UnsafeArchiveError(f"{archive}: member '{member}' is a {kind}, but an earlier member of the "
                                 f"archive already put a {earlier} at '{location}' (two entries of the same name)")
    claimed[location] = kind


def check_tar(archive: Path, members: Iterable[tarfile.TarInfo], max_bytes: int) -> list[tarfile.TarInfo]:
    """Validate every member of a tar archive without extracting anything.

    Paths and link targets are walked through the symlinks extracted before them, so a chain of
    links that each look harmless (``p/q -> ..``, then ``f -> p/q/../x``) cannot lead outside.
    Two members that land at one place must be a file replacing a file or a link (or a link a
    link); a symlink or folder over an earlier file, or a file over an earlier folder, is refused.
    """
    checked, total = [], 0
    links: dict[str, str] = {}  # where each symlink lands on disk (earlier links followed) -> its target
    claimed: dict[str, str] = {}  # where each member lands on disk -> "file", "folder" or "symlink"
    for member in members:
        name = _clean_name(archive, member.name)
        if member.isdev() or member.isfifo() or not (member.isfile() or member.isdir() or member.issym()
                                                     or member.islnk()):
            raise UnsafeArchiveError(f"{archive}: member '{member.name}' is a device, fifo or special file")
        parent = _resolve(archive, links, posixpath.dirname(name)) if name else ""
        if parent is None:
            raise UnsafeArchiveError(f"{archive}: member '{member.name}' would be written through a link "
                                     f"outside the target folder")
        location = posixpath.join(parent, posixpath.basename(name)) if name else ""
        if member.issym() or member.islnk():
            _check_link(archive, name, member.linkname, hard=member.islnk())
            base = "" if member.islnk() else parent
            landed = _resolve(archive, links, posixpath.join(base, member.linkname.replace("\\", "/")))
            if landed is None:
                raise UnsafeArchiveError(f"{archive}: member '{member.name}' links to '{member.linkname}', which "
                                         f"leads outside the target folder through another link")
            if member.islnk() and landed == location:
                raise UnsafeArchiveError(f"{archive}: member '{member.name}' is a hard link to itself")
        if location:
            _claim(archive, claimed, member.name, _kind(member), parent, location)
        if member.issym():
            links[location] = member.linkname.replace("\\", "/")
        else:
            links.pop(location, None)  # a later member replaces the link, as tar extracts it
        total += max(0, member.size) if member.isfile() else 0
        if total > max_bytes:
            raise UnsafeArchiveError(f"{archive}: member '{member.name}' takes the contents past the limit of "
                                     f"{max_bytes} bytes (zip bomb?)")
        checked.append(member)
    return checked


def _extract_tar(archive: Path, root: Path, max_bytes: int) -> list[str]:
    written: list[str] = []
    budget = [max_bytes]
    with tarfile.open(archive, "r:*") as tar:
        members = check_tar(archive, tar.getmembers(), max_bytes)
        for member in members:
            name = _clean_name(archive, member.name)
            if not name:
                continue
            try:
                _extract_tar_member(tar, member, archive, root, name, budget, written)
            except (FileExistsError, IsADirectoryError, NotADirectoryError, shutil.SameFileError) as error:
                # A name clash check_tar could not foresee (a member under a dangling link, say):
                # refused with the member named, as the clashes it does foresee are.
                raise UnsafeArchiveError(f"{archive}: member '{member.name}' cannot be extracted: {error}") from None
    return written


def _extract_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, root: Path, name: str,
                        budget: list[int], written: list[str]) -> None:
    path = _target(root, archive, name)
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
    elif member.isfile():
        path = _file_target(root, archive, name)
        source = tar.extractfile(member)
        assert source is not None
        _copy_limited(source, path, archive, member.name, budget)
        written.append(name)
    elif member.issym():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        os.symlink(member.linkname, path)
        if not _inside(root, path):  # defence in depth: check_tar has walked the same links
            path.unlink()
            raise UnsafeArchiveError(f"{archive}: symlink '{member.name}' -> '{member.linkname}' "
                                     f"leads outside the target folder")
    else:  # hard link: a copy of a file extracted earlier (links never share inodes with the archive)
        source_name = _check_link(archive, name, member.linkname, hard=True)
        source_path = root / source_name
        if not source_path.is_file() or not _inside(root, source_path):
            raise UnsafeArchiveError(f"{archive}: hard link '{member.name}' points to '{member.linkname}', "
                                     f"which is not a file extracted from the archive")
        shutil.copyfile(source_path, _file_target(root, archive, name))
        written.append(name)


def _extract_zip(archive: Path, root: Path, max_bytes: int) -> list[str]:
    written: list[str] = []
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        total = 0
        claimed: dict[str, str] = {}
        for info in infos:
            name = _clean_name(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member '{info.filename}' is a symlink (not extracted from zip)")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise UnsafeArchiveError(f"{archive}: member '{info.filename}' is a device, fifo or special file")
            if name:
                _claim(archive, claimed, info.filename, "folder" if info.is_dir() else "file", posixpath.dirname(name),
                       name)
            total += info.file_size
            if total > max_bytes:
                raise UnsafeArchiveError(f"{archive}: member '{info.filename}' takes the contents past the limit of "
                                         f"{max_bytes} bytes (zip bomb?)")
        budget = [max_bytes]  # declared sizes can lie: count what is really inflated
        for info in infos:
            name = _clean_name(archive, info.filename)
            if not name:
                continue
            path = _target(root, archive, name)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path = _file_target(root, archive, name)
            with bundle.open(info) as source:
                _copy_limited(source, path, archive, info.filename, budget)
            written.append(name)
    return written


def safe_extract(archive: str | os.PathLike, destination: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES
                 ) -> list[str]:
    """Extract a tar (any compression) or zip archive into ``destination``; returns the files written.

    Every member is checked before the first byte is written; ``UnsafeArchiveError`` names the member.
    """
    archive, root = Path(archive), Path(destination)
    root.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, root, max_bytes)
    try:
        return _extract_tar(archive, root, max_bytes)
    except tarfile.TarError as error:
        raise UnsafeArchiveError(f"{archive}: not a readable tar or zip archive ({error})") from None


def read_tar_member(archive: str | os.PathLike, name: str, max_bytes: int = 1 << 31) -> bytes:
    """The bytes of one regular-file member of a tar archive, read without extracting anything else."""
    archive = Path(archive)
    with tarfile.open(archive, "r:*") as tar:
        try:
            member = tar.getmember(name)
        except KeyError:
            raise UnsafeArchiveError(f"{archive}: has no member '{name}'") from None
        _clean_name(archive, member.name)
        if not member.isfile():
            raise UnsafeArchiveError(f"{archive}: member '{name}' is not a regular file")
        if member.size > max_bytes:
            raise UnsafeArchiveError(f"{archive}: member '{name}' is {member.size} bytes, above the {max_bytes} limit")
        source = tar.extractfile(member)
        assert source is not None
        return source.read()
