"""Archives are untrusted on restore: unsafe members are refused before anything is written."""

from __future__ import annotations

import io
import tarfile

import pytest

from backupd.errors import IntegrityError
from backupd.tarsafety import check_tar_stream


def archive(*members: tuple[str, str, str]) -> io.BytesIO:
    """members: (type, name, link target or content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = extra.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            info.linkname = extra
            tar.addfile(info)
    buf.seek(0)
    return buf


def test_ordinary_archive_passes_and_counts_members():
    tar = archive(("dir", "./", ""), ("dir", "./sub", ""), ("file", "./sub/a", "x"),
                  ("sym", "./sub/rel", "../sub/a"), ("sym", "./dangling", "nowhere/at/all"),
                  ("hard", "./sub/b", "./sub/a"))
    assert check_tar_stream(tar) == 6


@pytest.mark.parametrize("members,reason", [
    ([("file", "/etc/passwd", "x")], "absolute path"),
    ([("file", "../escape", "x")], "contains '..'"),
    ([("file", "a/../../escape", "x")], "contains '..'"),
    ([("sym", "link", "/etc")], "points outside"),
    ([("sym", "link", "../../etc")], "points outside"),
    ([("sym", "sub/link", "../..")], "points outside"),
    ([("sym", "link", "dir"), ("file", "link/passwd", "x")], "passes through symlink 'link'"),
    ([("hard", "h", "/etc/shadow")], "points outside"),
    ([("hard", "h", "../x")], "points outside"),
    ([("sym", "l", "d"), ("hard", "h", "l/x")], "passes through a symlink"),
])
def test_unsafe_members_are_refused(members, reason):
    with pytest.raises(IntegrityError, match=reason):
        check_tar_stream(archive(*members))


def test_a_symlink_replaced_by_a_directory_is_no_longer_a_trap():
    check_tar_stream(archive(("sym", "d", "x"), ("dir", "d", ""), ("file", "d/f", "y")))


def test_truncated_archive_is_not_well_formed():
    data = archive(("file", "a", "x" * 5000)).getvalue()
    with pytest.raises(IntegrityError, match="not a well-formed tar"):
        check_tar_stream(io.BytesIO(data[:700]))


def stream_of(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("chunk", [1, 511, 512, 513, 4096, 1 << 20])
def test_guard_passes_bytes_through_unchanged_up_to_the_end_mark_whatever_the_chunking(chunk):
    from backupd.tarsafety import guarded

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, size in (("./a/" + "long" * 60, 3000), ("./b", 0), ("./ü-\udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape"), 700)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    data = buf.getvalue()
    out = b"".join(guarded(stream_of(data, chunk)))
    # Everything up to the end-of-archive mark, unchanged; the record padding after it is not sent.
    assert data.startswith(out) and out.endswith(bytes(1024)) and len(out) < len(data)
    assert data[len(out):] == bytes(len(data) - len(out))
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert [m.size for m in tar.getmembers()] == [3000, 0, 700]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_are_checked_in_gnu_and_pax_form(fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("d" * 150 + "/../../../escape"))
    buf.seek(0)
    with pytest.raises(IntegrityError, match="contains '..'"):
        check_tar_stream(buf)


def test_unsafe_member_is_refused_before_its_header_is_passed_on():
    from backupd.tarsafety import guarded

    data = archive(("file", "./ok", "fine"), ("sym", "./evil", "/etc")).getvalue()
    passed = bytearray()
    with pytest.raises(IntegrityError):
        for piece in guarded(stream_of(data, 512)):
            passed += piece
    assert len(passed) == 1024  # the first member's header and content, nothing of the symlink


def test_global_pax_header_renaming_members_is_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "x"}) as tar:
        tar.addfile(tarfile.TarInfo("a"))
    buf.seek(0)
    with pytest.raises(IntegrityError, match="global PAX header"):
        check_tar_stream(buf)


def test_corrupt_header_checksum_is_not_well_formed():
    data = bytearray(archive(("file", "./a", "x" * 100)).getvalue())
    data[10] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum"):
        check_tar_stream(io.BytesIO(bytes(data)))


def test_header_checksums_of_old_tars_that_sum_signed_bytes_are_accepted():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("./caf\xe9")  # a byte >= 0x80: signed and unsigned sums differ
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    data = bytearray(buf.getvalue())
    unsigned, signed = tarfile.calc_chksums(bytes(data[:512]))
    assert signed != unsigned
    data[148:156] = b"%06o\0 " % signed
    assert check_tar_stream(io.BytesIO(bytes(data))) == 1


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_an_extended_header_too_large_to_hold_is_refused_before_it_is_read(kind):
    """Such headers are held whole; one claiming 4 GiB must not make the guard buffer the stream."""
    from backupd.tarsafety import guarded

    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, 4 << 30
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    drawn = []

    def endless():
        yield header
        while len(drawn) < 100:  # bounded, so a guard that buffers fails here instead of eating memory
            drawn.append(1 << 20)
            yield bytes(1 << 20)
        raise AssertionError("the guard held 100 MiB of an extended header")

    with pytest.raises(IntegrityError, match="unsafe archive: an extended header of 4294967296 bytes"):
        for _ in guarded(endless()):
            pass
    assert len(drawn) == 0  # refused on its header alone
