"""Archives are untrusted on restore: unsafe members are refused before anything is written."""

from __future__ import annotations

import io
import tarfile

import pytest

from backupd.errors import IntegrityError, UnsafeArchiveError
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


def test_links_pointing_anywhere_are_data_and_pass():
    """Absolute, dangling and climbing symlinks are restored as they were: only what is
    written *through* them is judged."""
    tar = archive(("dir", "./venv/bin", ""), ("sym", "./venv/bin/python3", "/usr/bin/python3.11"),
                  ("sym", "./access.log", "/dev/stdout"), ("sym", "./up", "../../.."),
                  ("sym", "./certs/ca.pem", "/usr/share/ca-certificates/mozilla/ca.crt"),
                  ("sym", "./certs/1a2b.0", "ca.pem"), ("sym", "./gone", "/only/in/the/app/container"),
                  ("sym", "./dot", "."), ("sym", "./chain", "dot/.."), ("hard", "./samelink", "./gone"))
    assert check_tar_stream(tar) == 10


@pytest.mark.parametrize("members,reason", [
    ([("file", "/etc/passwd", "x")], "absolute path"),
    ([("file", "../escape", "x")], "contains '..'"),
    ([("file", "a/../../escape", "x")], "contains '..'"),
    ([("sym", "link", "/etc"), ("file", "link/passwd", "x")], "passes through symlink 'link'"),
    ([("sym", "link", "dir"), ("file", "./link//./passwd", "x")], "passes through symlink 'link'"),
    ([("sym", "a", "."), ("sym", "b", "a/.."), ("file", "b/x", "x")], "passes through symlink 'b'"),
    ([("sym", "l", "/etc"), ("dir", "l", "")], "replaces a symlink"),
    ([("sym", "l", "/etc"), ("hard", "h", "l"), ("file", "h/passwd", "x")], "passes through symlink 'h'"),
    ([("sym", ".", "/etc")], "the target directory itself"),
    ([("hard", "h", "/etc/shadow")], "absolute path"),
    ([("hard", "h", "../x")], "contains '..'"),
    ([("hard", "h", "")], "empty name"),
    ([("sym", "l", "/"), ("hard", "h", "l/etc/shadow")], "passes through symlink 'l'"),
])
def test_unsafe_members_are_refused(members, reason):
    with pytest.raises(UnsafeArchiveError, match=reason):
        check_tar_stream(archive(*members))


def test_a_symlink_then_a_directory_of_the_same_name_is_refused():
    """tar keeps a symlink to a directory in place of a directory member, then writes through it."""
    with pytest.raises(UnsafeArchiveError, match="replaces a symlink"):
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

    data = archive(("file", "./ok", "fine"), ("sym", "./evil", "/etc"), ("file", "./evil/x", "")).getvalue()
    passed = bytearray()
    with pytest.raises(IntegrityError):
        for piece in guarded(stream_of(data, 512)):
            passed += piece
    # the first member's header and content, the symlink's header, nothing of the member through it
    assert len(passed) == 1536


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


# ------------------------------------------------------------------ reading as GNU tar 1.34 reads

from tests import tarforge as forge  # noqa: E402
from backupd.tarsafety import Member, TarChecker, guarded  # noqa: E402


class Recorder(TarChecker):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Member] = []

    def check(self, member: Member) -> None:
        super().check(member)
        self.seen.append(member)


def names(data: bytes) -> list[str]:
    checker = Recorder()
    for _ in guarded([data], checker):
        pass
    return [m.name for m in checker.seen]


def test_a_regular_file_named_with_a_slash_is_a_directory_and_its_data_is_refused():
    """tar makes 'd/' a directory and reads its data as the next headers."""
    inner = forge.member("hidden", data=b"pwned")
    assert names(forge.archive(forge.member("d/"), forge.member("d/f", data=b"x"))) == ["d/", "d/f"]
    with pytest.raises(UnsafeArchiveError, match="carries 1024 bytes"):
        names(forge.archive(forge.member("d/", data=inner)))


@pytest.mark.parametrize("kind", [b"2", b"5", b"6", b"1"])
def test_data_on_links_directories_and_fifos_is_refused(kind):
    """tar --extract reads such data as headers, tar --list skips it: two readings of one archive."""
    with pytest.raises(UnsafeArchiveError, match="carries"):
        names(forge.archive(forge.member("m", kind, data=forge.member("hidden", data=b"x"), link="t")))


@pytest.mark.parametrize("records", [
    b"30  path=../../../etc/passwd\n",  # two spaces: tar skips both
    b"21 path=ok/elsewhere",  # no newline
    b"99 path=ok\n",  # length past the end
    b"10 path=ok\n",  # length short of the newline
    b"012 path=ok\n",  # a leading zero
    b" 12 path=ok\n",  # a leading blank
    b"12 path=ok\nX",  # bytes after the last record
    b"6 =ok\n",  # no key
])
def test_pax_records_not_exactly_len_key_value_newline_are_refused(records):
    with pytest.raises(IntegrityError, match="PAX record"):
        names(forge.archive(forge.pax(records), forge.member("ok")))


@pytest.mark.parametrize("field", [b"1_024", b" +1024", b"+1024", b"0o1024", b"\x0012", b"12x", b"    ",
                                   b"\xff" + bytes(10) + b"\x01", b"\x81" + bytes(11), b"\x80" + b"\xff" * 11])
def test_sizes_tar_reads_otherwise_are_refused(field):
    with pytest.raises(IntegrityError):
        names(forge.header("f", size=field.ljust(12, b"\0")) + forge.end())


@pytest.mark.parametrize("value", ["1_024", " 1024", "+1024", "1024 ", "-1", "9" * 20, ""])
def test_pax_sizes_tar_reads_otherwise_are_refused(value):
    with pytest.raises(IntegrityError, match="PAX size"):
        names(forge.archive(forge.pax(forge.record("size", value)), forge.member("f")))


def test_a_negative_base256_size_is_refused_at_once():
    data = forge.header("f", size=b"\xff" * 12) + bytes(1 << 20)
    with pytest.raises(IntegrityError, match="negative size"):
        names(data)


def test_sizes_are_read_in_octal_with_blanks_or_in_base256():
    data = b"abc"
    for field in (b"        3 \0\0", b"00000000003\0", b"000000000003", b"\x80" + bytes(10) + b"\x03"):
        assert names(forge.header("f", size=field) + forge.pad(data) + forge.end()) == ["f"]


def test_only_the_last_pax_header_counts():
    assert names(forge.archive(forge.pax(forge.record("path", "../../evil")), forge.pax(forge.record("path", "ok")),
                               forge.member("ignored"))) == ["ok"]
    with pytest.raises(UnsafeArchiveError, match="contains '..'"):
        names(forge.archive(forge.pax(forge.record("path", "ok")), forge.pax(forge.record("path", "../../evil")),
                            forge.member("ignored")))


def test_a_pax_path_wins_over_a_later_gnu_long_name_and_the_sparse_name_over_both():
    with pytest.raises(UnsafeArchiveError, match="'../evil' contains"):
        names(forge.archive(forge.pax(forge.record("path", "../evil")), forge.long_name("ok"), forge.member("x")))
    assert names(forge.archive(forge.pax(forge.record("path", "ok")), forge.long_name("../evil"),
                               forge.member("x"))) == ["ok"]
    assert names(forge.archive(forge.pax(forge.record("GNU.sparse.name", "real") + forge.record("path", "p")),
                               forge.member("x"))) == ["real"]
    assert names(forge.archive(forge.long_name("a"), forge.long_name("b"), forge.member("x"))) == ["b"]


def test_the_prefix_field_counts_under_the_posix_magic_only():
    assert names(forge.archive(forge.member("x", prefix=b"../..", magic=forge.OLD_GNU_MAGIC))) == ["x"]
    assert names(forge.archive(forge.member("x", prefix=b"a/b"))) == ["a/b/x"]
    with pytest.raises(UnsafeArchiveError, match="contains '..'"):
        names(forge.archive(forge.member("x", prefix=b"../..")))


def test_a_hard_link_to_a_symlink_is_a_symlink_too():
    with pytest.raises(UnsafeArchiveError, match="passes through symlink 'h'"):
        names(forge.archive(forge.member("l", b"2", link="/etc"), forge.member("h", b"1", link="l"),
                            forge.member("h/passwd", data=b"x")))


@pytest.mark.parametrize("records,reason", [
    (forge.record("GNU.dumpdir", "Ya\0"), "cannot judge"),
    (forge.record("GNU.volume.offset", "5"), "cannot judge"),
    (forge.record("something.else", "x"), "cannot judge"),
    (forge.record("path", "a\0b"), "NUL"),
])
def test_pax_records_the_guard_cannot_judge_are_refused(records, reason):
    with pytest.raises(UnsafeArchiveError, match=reason):
        names(forge.archive(forge.pax(records), forge.member("f")))


def test_a_global_header_may_carry_metadata_only():
    assert names(forge.archive(forge.pax(forge.record("mtime", "1.5"), b"g"), forge.member("f"))) == ["f"]
    for key in ("size", "linkpath", "GNU.sparse.name"):
        with pytest.raises(UnsafeArchiveError, match="global PAX header"):
            names(forge.archive(forge.pax(forge.record(key, "1"), b"g"), forge.member("f")))


@pytest.mark.parametrize("kind", [b"S", b"D", b"V", b"M", b"N", b"A", b"Z"])
def test_member_types_backupd_never_writes_are_refused(kind):
    with pytest.raises(UnsafeArchiveError, match="never writes"):
        names(forge.archive(forge.member("f", kind)))


def sparse(map_text: bytes, data_blocks: int, realsize: int = 1 << 20, **extra: str) -> bytes:
    records = forge.record("GNU.sparse.major", "1") + forge.record("GNU.sparse.minor", "0") + \
        forge.record("GNU.sparse.name", "./sp") + forge.record("GNU.sparse.realsize", str(realsize))
    for key, value in extra.items():
        records += forge.record(key, value)
    body = forge.pad(map_text) + bytes(data_blocks * 512)
    return forge.archive(forge.pax(records), forge.member("./GNUSparseFile.1/sp", data=body))


def test_a_pax_sparse_file_as_gnu_tar_writes_it_passes():
    assert names(sparse(b"2\n4096\n1000\n1048576\n0\n", 2)) == ["./sp"]


@pytest.mark.parametrize("map_text,blocks,reason", [
    (b"1\n0\n4096\n", 2, "runs past its data"),  # tar would read 8 blocks of data, not 2
    (b"1\n1048000\n4096\n", 8, "beyond the file's size"),
    (b"1\n0\n+12\n", 1, "malformed sparse map"),
    (b"1\n0\n" + b"1" * 25 + b"\n", 1, "too long"),
    (b"9999999\n", 0, "sparse map"),
])
def test_sparse_maps_tar_would_read_otherwise_are_refused(map_text, blocks, reason):
    with pytest.raises(IntegrityError, match=reason):
        names(sparse(map_text, blocks))


def test_sparse_forms_backupd_never_writes_are_refused():
    with pytest.raises(UnsafeArchiveError, match="cannot judge"):
        names(sparse(b"0\n", 0, **{"GNU.sparse.map": "0,10"}))
    with pytest.raises(UnsafeArchiveError, match="sparse form"):
        names(sparse(b"0\n", 0, **{"GNU.sparse.major": "0"}))


@pytest.mark.parametrize("data", [
    forge.pax(b"30 "), forge.pax(b"3"), forge.pax(b"1 \n"), forge.header("x", b"x", size=5) + b"30 pa",
    forge.header("f", size=b"\x80\x7f" + bytes(10)), b"\x00" * 511 + b"\x01",
])
def test_garbage_raises_the_integrity_error_and_nothing_else(data):
    with pytest.raises(IntegrityError):
        names(data)


@pytest.mark.parametrize("offset,field", [(100, b"\x01000644\0"), (108, b"+0\0\0\0\0\0\0"), (116, b"\xff" * 8),
                                          (136, b"1_000\0\0\0\0\0\0\0"), (108, b"\x80" + b"\x01" * 7)])
def test_member_numbers_tar_cannot_read_are_refused(offset, field):
    """tar fails the restore on them; the guard says so before anything is written."""
    block = bytearray(forge.header("f"))
    block[offset:offset + len(field)] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    with pytest.raises(IntegrityError, match="not a well-formed tar"):
        names(bytes(block) + forge.end())


@pytest.mark.parametrize("key,value", [("mtime", "yesterday"), ("atime", "1_0"), ("uid", "-1"),
                                       ("gid", str(1 << 40)), ("SCHILY.devmajor", "x")])
def test_pax_metadata_tar_cannot_read_is_refused(key, value):
    with pytest.raises(IntegrityError, match=f"PAX {key}"):
        names(forge.archive(forge.pax(forge.record(key, value)), forge.member("f")))
    assert names(forge.archive(forge.pax(forge.record("mtime", "-315619200.123456789")), forge.member("f"))) == ["f"]


def test_the_pax_records_of_xattrs_acls_and_selinux_labels_pass():
    """What GNU tar --xattrs --acls --selinux writes: metadata the guard accepts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("./f")
        info.size = 2
        info.pax_headers = {
            "SCHILY.xattr.user.origin": "scanner 7",
            "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x04",
            "SCHILY.xattr.system.posix_acl_access": "\x02\x00\x00\x00",
            "SCHILY.acl.access": "user::rw-\nuser:1234:r--\ngroup::r--\nmask::r--\nother::---\n",
            "RHT.security.selinux": "system_u:object_r:container_file_t:s0",
        }
        tar.addfile(info, io.BytesIO(b"hi"))
        directory = tarfile.TarInfo("./d")
        directory.type = tarfile.DIRTYPE
        directory.pax_headers = {"SCHILY.acl.default": "user::rwx\ngroup::r-x\nother::---\n"}
        tar.addfile(directory)
    buf.seek(0)
    assert check_tar_stream(buf) == 2
