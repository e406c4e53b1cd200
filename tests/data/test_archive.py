"""Safe extraction: traversal, absolute paths, escaping links, device files and zip bombs are refused."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from duplus.data.archive import read_tar_member, safe_extract
from duplus.errors import UnsafeArchiveError


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_good_tar_extracts_files_folders_and_inner_links(tmp_path: Path) -> None:
    folder = tarfile.TarInfo("Task/imagesTr")
    folder.type = tarfile.DIRTYPE
    archive = _tar(tmp_path / "good.tar.gz", [
        (folder, None), (_file("Task/imagesTr/a.nii.gz"), b"image-a"), (_file("Task/dataset.json"), b"{}"),
        (_link("Task/latest.nii.gz", "imagesTr/a.nii.gz", tarfile.SYMTYPE), None),
        (_link("Task/copy.nii.gz", "Task/imagesTr/a.nii.gz", tarfile.LNKTYPE), None),
    ])
    written = safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/Task/imagesTr/a.nii.gz").read_bytes() == b"image-a"
    assert (tmp_path / "out/Task/latest.nii.gz").read_bytes() == b"image-a"
    assert (tmp_path / "out/Task/copy.nii.gz").read_bytes() == b"image-a"
    assert "Task/dataset.json" in written
    assert read_tar_member(archive, "Task/dataset.json") == b"{}"


@pytest.mark.parametrize("members, culprit", [
    ([(_file("../evil.txt"), b"x")], "../evil.txt"),
    ([(_file("Task/../../evil.txt"), b"x")], "Task/../../evil.txt"),
    ([(_file("/etc/evil.txt"), b"x")], "/etc/evil.txt"),
    ([(_link("Task/escape", "../../outside", tarfile.SYMTYPE), None)], "Task/escape"),
    ([(_link("Task/abs", "/etc/passwd", tarfile.SYMTYPE), None)], "Task/abs"),
    ([(_link("Task/hard", "../outside.txt", tarfile.LNKTYPE), None)], "Task/hard"),
    ([(_link("Task/hardabs", "/etc/passwd", tarfile.LNKTYPE), None)], "Task/hardabs"),
])
def test_escaping_members_are_refused_and_nothing_is_written(tmp_path: Path, members: list, culprit: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", [(_file("Task/ok.txt"), b"fine"), *members])
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, tmp_path / "out")
    assert culprit in str(caught.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out" / "Task" / "ok.txt").exists()  # checked before the first byte is written


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_device_and_fifo_members_are_refused(tmp_path: Path, kind: bytes) -> None:
    device = tarfile.TarInfo("Task/dev")
    device.type = kind
    archive = _tar(tmp_path / "dev.tar", [(device, None)])
    with pytest.raises(UnsafeArchiveError, match="Task/dev.*device, fifo"):
        safe_extract(archive, tmp_path / "out")


def test_dotdot_through_an_inner_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    archive = _tar(tmp_path / "chain.tar", [(_link("a", ".", tarfile.SYMTYPE), None),
                                            (_file("a/../../outside/x.txt"), b"x")])
    with pytest.raises(UnsafeArchiveError, match=r"a/\.\./\.\./outside/x\.txt"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "outside" / "x.txt").exists()


def test_a_chain_of_innocent_looking_links_cannot_lead_outside(tmp_path: Path) -> None:
    # p/q -> .. is the root itself; f -> p/q/../escaped.txt reads as p/escaped.txt, but the
    # operating system follows p/q first and lands beside the target folder.
    archive = _tar(tmp_path / "chain.tar", [(_link("p/q", "..", tarfile.SYMTYPE), None),
                                            (_link("f", "p/q/../escaped.txt", tarfile.SYMTYPE), None),
                                            (_file("f"), b"owned")])
    with pytest.raises(UnsafeArchiveError, match="'f' links to 'p/q/../escaped.txt'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before writing


def test_a_member_written_through_a_chained_folder_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    archive = _tar(tmp_path / "chain.tar", [(_link("a/b", "..", tarfile.SYMTYPE), None),
                                            (_link("c", "a/b/../outside", tarfile.SYMTYPE), None),
                                            (_file("c/x.txt"), b"x")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "outside" / "x.txt").exists()


def test_link_loops_are_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "loop.tar", [(_link("a", "b", tarfile.SYMTYPE), None),
                                           (_link("b", "a", tarfile.SYMTYPE), None),
                                           (_file("a/x.txt"), b"x")])
    with pytest.raises(UnsafeArchiveError, match="nest deeper"):
        safe_extract(archive, tmp_path / "out")


def test_a_file_member_replaces_an_earlier_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "replace.tar", [(_file("real.txt"), b"original"),
                                              (_link("alias.txt", "real.txt", tarfile.SYMTYPE), None),
                                              (_file("alias.txt"), b"replacement")])
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "real.txt").read_bytes() == b"original"
    assert not (tmp_path / "out" / "alias.txt").is_symlink()
    assert (tmp_path / "out" / "alias.txt").read_bytes() == b"replacement"


def test_tar_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "big.tar.gz", [(_file("a.bin"), b"\0" * 4096), (_file("b.bin"), b"\0" * 4096)])
    with pytest.raises(UnsafeArchiveError, match="b.bin.*limit"):
        safe_extract(archive, tmp_path / "out", max_bytes=6000)


def test_zip_bomb_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("layer/zeros.bin", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 100_000  # a tiny file that claims megabytes
    with pytest.raises(UnsafeArchiveError, match="layer/zeros.bin.*zip bomb"):
        safe_extract(bomb, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out" / "layer" / "zeros.bin").exists()


def test_zip_traversal_absolute_and_symlink_are_refused(tmp_path: Path) -> None:
    for name, culprit in (("../evil.txt", "../evil.txt"), ("/abs.txt", "/abs.txt")):
        archive = tmp_path / f"z{len(name)}.zip"
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr(zipfile.ZipInfo(name), b"x")
        with pytest.raises(UnsafeArchiveError, match=culprit.replace(".", r"\.")):
            safe_extract(archive, tmp_path / "out")
    link = zipfile.ZipInfo("link")
    link.external_attr = (0o120777 << 16)
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="'link' is a symlink"):
        safe_extract(archive, tmp_path / "out")


def test_good_zip_extracts(tmp_path: Path) -> None:
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("amos22/imagesTr/amos_0001.nii.gz", b"ct")
    assert safe_extract(archive, tmp_path / "out") == ["amos22/imagesTr/amos_0001.nii.gz"]
    assert (tmp_path / "out/amos22/imagesTr/amos_0001.nii.gz").read_bytes() == b"ct"


def test_read_tar_member_refuses_links(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "l.tar", [(_link("x", "/etc/passwd", tarfile.SYMTYPE), None)])
    with pytest.raises(UnsafeArchiveError, match="'x' is not a regular file"):
        read_tar_member(archive, "x")


def _folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("members, culprit", [
    ([(_file("Task/a.txt"), b"x"), (_link("Task/a.txt", "b.txt", tarfile.SYMTYPE), None)], "Task/a.txt"),
    ([(_file("Task/a"), b"x"), (_folder("Task/a"), None)], "Task/a"),
    ([(_folder("Task/a"), None), (_file("Task/a"), b"x")], "Task/a"),
    ([(_file("Task/a"), b"x"), (_file("Task/a/b.txt"), b"y")], "Task/a/b.txt"),
    ([(_file("Task/a"), b"x"), (_link("Task/a", "Task/a", tarfile.LNKTYPE), None)], "Task/a"),
    ([(_file("Task/b.txt"), b"x"), (_link("lnk", "Task", tarfile.SYMTYPE), None),
      (_link("lnk/b.txt", "ok.txt", tarfile.SYMTYPE), None)], "lnk/b.txt"),
], ids=["file-then-symlink", "file-then-folder", "folder-then-file", "file-then-file-inside-it",
        "hard-link-to-itself", "symlink-over-a-file-through-a-folder-link"])
def test_members_whose_names_clash_are_refused_before_anything_is_written(tmp_path: Path, members: list,
                                                                          culprit: str) -> None:
    # A second entry of one name that tar could only extract by deleting the first (a link or a
    # folder where a file is) is the archive's fault: named, and refused before the first byte.
    archive = _tar(tmp_path / "clash.tar", [(_file("Task/ok.txt"), b"fine"), *members])
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, tmp_path / "out")
    assert str(archive) in str(caught.value) and f"member '{culprit}'" in str(caught.value)
    assert not (tmp_path / "out" / "Task").exists()


def test_repeated_folders_and_a_file_over_a_file_still_extract(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "repeat.tar", [(_folder("Task"), None), (_file("Task/a.txt"), b"first"),
                                             (_folder("Task"), None), (_file("Task/a.txt"), b"second")])
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "Task" / "a.txt").read_bytes() == b"second"


def test_a_member_under_a_dangling_folder_link_is_refused_by_name(tmp_path: Path) -> None:
    # "lnk" -> "absent" is harmless, but nothing can be written under it: the clash on disk is
    # reported as the archive's, not as a bare FileExistsError.
    archive = _tar(tmp_path / "dangling.tar", [(_link("lnk", "absent", tarfile.SYMTYPE), None),
                                               (_file("lnk/x.txt"), b"x")])
    with pytest.raises(UnsafeArchiveError, match=r"dangling\.tar: member 'lnk/x\.txt' cannot be extracted"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "absent").exists()


def test_zip_members_whose_names_clash_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("Task/a", b"x")
        bundle.writestr("Task/a/b.txt", b"y")
    with pytest.raises(UnsafeArchiveError, match=r"clash\.zip: member 'Task/a/b\.txt' needs the folder 'Task/a'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "Task").exists()
