"""Volume backups end to end against a real Docker engine.

Contents are created and compared straight through the volume's mount point
on the host (the tests run as root beside the engine), so the comparison sees
every byte, owner, mode, timestamp, link and hole exactly as the kernel does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import zstandard

from tests.integration.conftest import remove_volume
from tests.integration.services import APP_COMMAND, mountpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict:
    """Everything about a tree that a restore must bring back, keyed by raw name bytes."""
    root_b = os.fsencode(root)
    entries: dict[bytes, tuple] = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root_b)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                with open(path, "rb") as f:
                    extra = hashlib.file_digest(f, "sha256").hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(kind):
                extra = os.readlink(path)
            size = st.st_size if not stat.S_ISDIR(kind) else None
            entries[rel] = (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, extra)
    top = os.lstat(root_b)
    entries[b"."] = (top.st_mode, top.st_uid, top.st_gid)
    hardlinks = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
    return {"entries": entries, "hardlinks": hardlinks}


def populate_awkward(root: Path, big_mb: int = 110, small_files: int = 3000) -> None:
    """The cases tar-based backups tend to get wrong."""
    r = os.fsencode(root)
    os.chown(r, 1000, 1000)
    os.chmod(r, 0o750)

    def p(*parts: bytes) -> bytes:
        return os.path.join(r, *parts)

    os.makedirs(p(b"empty", b"nested", b"dir"))
    os.makedirs(p(b"data"))
    with open(p(b"data", b"plain.txt"), "wb") as f:
        f.write(b"hello\n" * 1000)
    open(p(b"data", b"empty-file"), "wb").close()
    # owners that exist nowhere, and special modes
    with open(p(b"data", b"owned"), "wb") as f:
        f.write(b"x")
    os.chown(p(b"data", b"owned"), 123456, 654321)
    with open(p(b"data", b"setuid"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chmod(p(b"data", b"setuid"), 0o4755)
    os.makedirs(p(b"setgid-dir"))
    os.chmod(p(b"setgid-dir"), 0o2775)
    os.makedirs(p(b"sticky"))
    os.chmod(p(b"sticky"), 0o1777)
    with open(p(b"data", b"secret"), "wb") as f:
        f.write(b"s")
    os.chmod(p(b"data", b"secret"), 0o600)
    # unreadable to anyone but root with DAC_READ_SEARCH (backup) or DAC_OVERRIDE (restore):
    # mode 000, owned by other users, inside a mode-000 directory of yet another user
    os.makedirs(p(b"locked", b"inner"))
    with open(p(b"locked", b"inner", b"nobody-reads"), "wb") as f:
        f.write(b"only root reads this")
    os.chown(p(b"locked", b"inner", b"nobody-reads"), 4242, 4242)
    os.chmod(p(b"locked", b"inner", b"nobody-reads"), 0o000)
    os.chown(p(b"locked", b"inner"), 4343, 4343)
    os.chmod(p(b"locked", b"inner"), 0o000)
    os.chown(p(b"locked"), 999, 70)
    os.chmod(p(b"locked"), 0o000)
    # setuid and setgid files of other users and groups (kept through chown only with FSETID)
    with open(p(b"data", b"setuid-999"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chown(p(b"data", b"setuid-999"), 999, 70)
    os.chmod(p(b"data", b"setuid-999"), 0o6750)
    # links: relative, dangling, hard
    os.symlink(b"plain.txt", p(b"data", b"link-to-plain"))
    os.symlink(b"does/not/exist", p(b"data", b"dangling"))
    os.symlink(b"../data", p(b"empty", b"up-link"))
    os.link(p(b"data", b"plain.txt"), p(b"data", b"hardlink-to-plain"))
    os.link(p(b"data", b"plain.txt"), p(b"empty", b"nested", b"third-name"))
    # a sparse file: 64 MiB with two small islands of data
    with open(p(b"sparse.img"), "wb") as f:
        f.write(b"start")
        f.seek(32 << 20)
        f.write(b"middle")
        f.truncate(64 << 20)
    # names: non-UTF-8 bytes, newline, spaces, very long, deep
    for name in (b"caf\xc3\xa9", b"latin1-\xe9\xff", b"new\nline", b"  spaced  name ", b"L" * 250):
        with open(p(b"data", name), "wb") as f:
            f.write(name)
    deep = p(*([b"d" * 60] * 6))
    os.makedirs(deep)
    with open(os.path.join(deep, b"deep-file"), "wb") as f:
        f.write(b"deep")
    os.mkfifo(p(b"data", b"fifo"))
    # many small files
    for i in range(small_files):
        d = p(b"small", str(i % 50).encode())
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.txt".encode()), "wb") as f:
            f.write(f"small file {i}\n".encode() * (i % 7))
    # one big incompressible file
    with open(p(b"big.bin"), "wb") as f:
        for _ in range(big_mb):
            f.write(os.urandom(1 << 20))
    # timestamps with nanoseconds, set last (after children were created)
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(r, topdown=False)):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            os.utime(path, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_987_654_321 + i),
                     follow_symlinks=False)


def write_config(tmp_path: Path, helper_image: str, jobs: dict, **extra) -> Path:
    config = {
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "helper_image": helper_image,
        "destinations": {"local": {"type": "local", "path": str(tmp_path / "backups")}},
        "jobs": jobs,
        **extra,
    }
    path = tmp_path / "backupd.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def backupd(config: Path, *args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "backupd", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"backupd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def listing(config: Path) -> list[dict]:
    return json.loads(backupd(config, "list", "--json", check=True).stdout)


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "backups").rglob("*") if p.is_file())


def archives(tmp_path: Path) -> list[Path]:
    return [p for p in stored_files(tmp_path) if ".tar." in p.name]


# ------------------------------------------------------------------ tests


def test_round_trip_brings_back_every_byte_owner_mode_link_hole_and_timestamp(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("awkward")
    root = mountpoint(docker_client, vol)
    populate_awkward(root)
    before = snapshot(root)
    config = write_config(tmp_path, helper_image, {"awkward": {"volumes": [vol]}})

    result = backupd(config, "backup", "awkward", check=True)
    backup_id = result.stdout.strip()
    [entry] = listing(config)
    assert entry["id"] == backup_id and entry["status"] == "succeeded"
    [art] = entry["artifacts"]
    assert art["kind"] == "volume" and art["name"] == vol
    [archive] = archives(tmp_path)
    assert archive.stat().st_size == art["size"]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == art["sha256"]  # sha256sum-checkable

    docker_client.volumes.get(vol).remove()
    backupd(config, "restore", backup_id, "--volume", vol, check=True)
    after = snapshot(mountpoint(docker_client, vol))
    assert after["hardlinks"] == before["hardlinks"]
    missing = set(before["entries"]) ^ set(after["entries"])
    assert not missing, f"entries differ: {sorted(missing)[:5]}"
    for name, attrs in before["entries"].items():
        assert after["entries"][name] == attrs, name
    sparse = os.stat(mountpoint(docker_client, vol) / "sparse.img")
    assert sparse.st_blocks * 512 < 1 << 20, "sparse file came back fully allocated"


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """The kernel's form of a POSIX ACL (what setfacl writes): (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, qualifier)
                                            for tag, perm, qualifier in sorted(entries))


USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER, NO_ID = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0xFFFFFFFF
ACCESS_ACL = posix_acl((USER_OBJ, 6, NO_ID), (USER, 4, 1234), (GROUP_OBJ, 4, NO_ID), (GROUP, 6, 4321),
                       (MASK, 6, NO_ID), (OTHER, 0, NO_ID))
DEFAULT_ACL = posix_acl((USER_OBJ, 7, NO_ID), (USER, 5, 1234), (GROUP_OBJ, 5, NO_ID), (MASK, 5, NO_ID),
                        (OTHER, 0, NO_ID))
# cap_net_bind_service+ep, as setcap writes it (VFS_CAP_REVISION_2, effective)
NET_BIND_SERVICE = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
KEPT_ATTRIBUTES = ("user.", "system.posix_acl_", "security.capability")


def attributes(root: Path) -> dict[str, dict[str, bytes]]:
    """The extended attributes (ACLs and capabilities included) of every entry under root."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        names = os.listxattr(path, follow_symlinks=False)
        found[str(path.relative_to(root))] = {
            name: os.getxattr(path, name, follow_symlinks=False)
            for name in sorted(names) if name.startswith(KEPT_ATTRIBUTES)}
    return found


def test_xattrs_acls_and_file_capabilities_round_trip(docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("xattrs")
    root = mountpoint(docker_client, vol)
    (root / "shared").mkdir()
    (root / "shared" / "report.txt").write_text("read by 1234, written by group 4321")
    tool = root / "server"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o755)
    try:
        os.setxattr(root / "shared" / "report.txt", "user.origin", b"scanner 7; \x00\xffbinary too")
        os.setxattr(root / "shared", "user.empty", b"")
        os.setxattr(root / "shared" / "report.txt", "system.posix_acl_access", ACCESS_ACL)
        os.setxattr(root / "shared", "system.posix_acl_default", DEFAULT_ACL)
        os.setxattr(tool, "security.capability", NET_BIND_SERVICE)
    except OSError as exc:
        pytest.skip(f"the filesystem of {root} keeps no user xattrs, POSIX ACLs or file capabilities: {exc}")
    os.chown(root / "shared" / "report.txt", 1000, 1000)
    before = attributes(root)
    assert before["server"] == {"security.capability": NET_BIND_SERVICE}  # chown would have cleared it
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    target = f"{vol}-restored"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        after = attributes(mountpoint(docker_client, target))
        assert after == before
        assert snapshot(mountpoint(docker_client, target))["entries"] == snapshot(root)["entries"]
    finally:
        docker_client.volumes.get(target).remove(force=True)
    assert "tar members well-formed and safe" in backupd(config, "verify", backup_id, check=True).stdout


def populate_real_world_links(root: Path) -> None:
    """Trees ordinary applications leave in volumes, full of absolute and dangling links."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3.11")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "lib64").symlink_to("lib")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    logs = root / "nginx" / "log"
    logs.mkdir(parents=True)
    (logs / "access.log").symlink_to("/dev/stdout")
    (logs / "error.log").symlink_to("/dev/stderr")
    certs = root / "ssl" / "certs"
    certs.mkdir(parents=True)
    (certs / "ca-certificates.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (certs / "ISRG_Root_X1.pem").symlink_to("/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt")
    (certs / "4042bcee.0").symlink_to("ISRG_Root_X1.pem")
    (certs / "ca-bundle.crt").symlink_to("../certs/ca-certificates.crt")
    (certs / "java").symlink_to("/etc/ssl/certs/java")
    (root / "current").symlink_to("/srv/app/releases/2024-05-01")  # exists only in the app's container
    (root / "up").symlink_to("../../..")


def test_absolute_dangling_and_climbing_links_round_trip_exactly(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("links")
    root = mountpoint(docker_client, vol)
    populate_real_world_links(root)
    before = snapshot(root)
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    target = f"{vol}-restored"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        restored = mountpoint(docker_client, target)
        assert os.readlink(restored / "venv" / "bin" / "python3") == "/usr/bin/python3.11"
        assert os.readlink(restored / "nginx" / "log" / "access.log") == "/dev/stdout"
        assert snapshot(restored) == before
    finally:
        docker_client.volumes.get(target).remove(force=True)


def readme_restore_commands() -> str:
    """The shell block under the README's restore-without-backupd marker, as written."""
    text = (REPO / "README.md").read_text()
    _, marker, rest = text.partition("<!-- restore-without-backupd -->")
    assert marker, "README lost its restore-without-backupd section"
    return rest.split("```sh\n", 1)[1].split("```", 1)[0]


def test_readme_restore_without_backupd_works_under_pipefail(docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("manual")
    root = mountpoint(docker_client, vol)
    populate_awkward(root, big_mb=2, small_files=100)
    populate_real_world_links(root)
    before = snapshot(root)
    identity = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                               capture_output=True, text=True).stdout.strip()
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}},
                          encryption={"age_recipients": [recipient]})
    backupd(config, "backup", "j", check=True)
    [archive] = archives(tmp_path)
    target = tmp_path / "restore" / "app_data"

    script = readme_restore_commands()
    lines = script.splitlines()
    assert lines[0] == "set -euo pipefail" and "--ignore-zeros" in script
    lines = [f"archive={archive}" if line.startswith("archive=") else
             f"target={target}" if line.startswith("target=") else line for line in lines]
    proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(target) == before


def test_attach_stream_transport_round_trips_too(docker_client, helper_image, volume_factory, tmp_path):
    """Without a mount shared with helpers, archives travel over Docker's attach stream."""
    vol = volume_factory("attach")
    root = mountpoint(docker_client, vol)
    populate_awkward(root, big_mb=20, small_files=200)
    before = snapshot(root)
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    attach = {"BACKUPD_TRANSFER": "attach"}
    backup_id = backupd(config, "backup", "j", check=True, env=attach).stdout.strip()
    target = f"{vol}-copy"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True, env=attach)
        after = snapshot(mountpoint(docker_client, target))
        assert after["entries"] == before["entries"] and after["hardlinks"] == before["hardlinks"]
    finally:
        docker_client.volumes.get(target).remove(force=True)


def test_restore_to_new_volume_leaves_the_original_untouched(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("orig")
    root = mountpoint(docker_client, vol)
    (root / "a.txt").write_text("one")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "compression": {"algorithm": "gzip"}}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    (root / "a.txt").write_text("changed")
    copy = f"{vol}-copy"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", copy, check=True)
        assert (mountpoint(docker_client, copy) / "a.txt").read_text() == "one"
        assert (root / "a.txt").read_text() == "changed"
        assert archives(tmp_path)[0].name.endswith(".tar.gz")
    finally:
        docker_client.volumes.get(copy).remove(force=True)


def test_non_empty_target_is_refused_without_force_and_left_untouched(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("keep")
    root = mountpoint(docker_client, vol)
    (root / "a.txt").write_text("backed up")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    (root / "a.txt").write_text("newer work")
    (root / "b.txt").write_text("more")
    before = snapshot(root)

    proc = backupd(config, "restore", backup_id, "--volume", vol)
    assert proc.returncode == 3
    assert f"volume '{vol}' is not empty" in proc.stderr and "--force" in proc.stderr
    assert snapshot(root) == before


def test_force_replaces_contents_and_restarts_the_containers_using_the_volume(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("force")
    root = mountpoint(docker_client, vol)
    (root / "a.txt").write_text("backed up")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    (root / "a.txt").write_text("newer")
    (root / "extra.txt").write_text("not in the backup")
    app = docker_client.containers.run(helper_image, APP_COMMAND, detach=True,
                                       volumes={vol: {"bind": "/data", "mode": "rw"}},
                                       name=f"app-{uuid.uuid4().hex[:8]}")
    try:
        started_before = app.attrs["State"]["StartedAt"]
        backupd(config, "restore", backup_id, "--volume", vol, "--force", check=True)
        app.reload()
        assert app.status == "running"
        assert app.attrs["State"]["StartedAt"] != started_before, "container was not stopped"
        assert sorted(p.name for p in root.iterdir()) == ["a.txt"]
        assert (root / "a.txt").read_text() == "backed up"
    finally:
        app.remove(force=True)


def test_force_empties_a_volume_of_locked_files_of_other_users_then_restores_owners_and_setuid(
        docker_client, helper_image, volume_factory, tmp_path):
    """Helpers hold only the capabilities they need (CLEAR_CAPS to empty, RESTORE_CAPS to
    unpack): enough for a volume whose every file and directory shuts root-without-them out."""
    vol = volume_factory("locked")
    root = mountpoint(docker_client, vol)
    populate_awkward(root, big_mb=1, small_files=20)
    before = snapshot(root)
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    # What the volume holds by now: a sticky directory of other users' mode-000 files, a
    # mode-000 tree, and the volume's own directory owned by another user, mode 000.
    os.makedirs(root / "tmp" / "deep")
    os.chmod(root / "tmp", 0o1777)
    for i, path in enumerate([root / "tmp" / "theirs", root / "tmp" / "deep" / "x"]):
        path.write_text("not in the backup")
        os.chown(path, 5000 + i, 5000 + i)
        os.chmod(path, 0o000)
    os.chown(root / "tmp" / "deep", 5002, 5002)
    os.chmod(root / "tmp" / "deep", 0o000)
    os.chown(root, 5003, 5003)
    os.chmod(root, 0o000)

    backupd(config, "restore", backup_id, "--volume", vol, "--force", check=True)
    after = snapshot(root)
    assert set(after["entries"]) == set(before["entries"])
    for name, attrs in before["entries"].items():
        assert after["entries"][name] == attrs, name
    assert after["hardlinks"] == before["hardlinks"]


def test_helpers_hold_only_their_capabilities_no_new_privileges_and_no_network(
        docker_client, helper_image, volume_factory):
    """As the kernel inside each kind of helper reports it."""
    from docker.types import Mount

    from backupd.docker_host import CLEAR_CAPS, READ_CAPS, RESTORE_CAPS, DockerHost

    bits = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "MKNOD": 27,
            "SETFCAP": 31}
    vol = volume_factory("privs")
    host = DockerHost(docker_client, helper_image)
    for caps in (READ_CAPS, RESTORE_CAPS, CLEAR_CAPS, ()):
        out = host.run_helper(["sh", "-c", "cat /proc/self/status; echo ---; cat /proc/net/dev"],
                              [Mount("/data", vol, type="volume")], purpose="the privilege probe", caps=caps)
        status_text, net_text = out.split("---\n")
        status = dict(line.split(":", 1) for line in status_text.splitlines() if ":" in line)
        expected = sum(1 << bits[cap] for cap in caps)
        for field in ("CapEff", "CapPrm", "CapBnd"):
            assert int(status[field], 16) == expected, (caps, field, status[field])
        assert status["NoNewPrivs"].strip() == "1"
        interfaces = [line.split(":")[0].strip() for line in net_text.splitlines()[2:]]
        assert interfaces == ["lo"], interfaces


def test_unknown_volume_is_an_error_before_anything_runs(helper_image, tmp_path):
    config = write_config(tmp_path, helper_image, {"j": {"volumes": ["no-such-volume-" + uuid.uuid4().hex]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 2
    assert "jobs.j.volumes[0]: volume 'no-such-volume-" in proc.stderr
    assert "does not exist" in proc.stderr
    [failed] = listing(config)  # recorded failed, with its cause, and nothing written
    assert failed["status"] == "failed" and failed["artifacts"] == []
    assert "planning failed: jobs.j.volumes[0]: volume 'no-such-volume-" in failed["error"]
    assert not (tmp_path / "backups").exists()


@pytest.fixture(scope="module")
def broken_helper(docker_client, helper_image):
    """A helper whose tar (GNU tar, to `tar --version`) writes 12 MB of bytes and then dies with exit 2."""
    tag = f"backupd-helper-broken:test-{uuid.uuid4().hex[:8]}"  # the engine is shared: never a fixed tag
    dockerfile = (f"FROM {helper_image}\n"
                  "COPY tar /usr/local/bin/tar\n"
                  'ENV PATH=/usr/local/bin:/usr/bin:/bin\n')
    script = (b"#!/bin/sh\n[ \"$1\" = --version ] && exec /bin/tar --version\n"
              b"head -c 12000000 /dev/urandom\necho 'tar: read error: Input/output error' >&2\nexit 2\n")
    ctx = io.BytesIO()
    with tarfile.open(fileobj=ctx, mode="w") as tar:
        for name, data, mode in (("Dockerfile", dockerfile.encode(), 0o644), ("tar", script, 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    ctx.seek(0)
    docker_client.images.build(fileobj=ctx, custom_context=True, tag=tag, rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


def test_helper_dying_mid_stream_fails_the_backup_and_leaves_no_archive(
        docker_client, broken_helper, volume_factory, tmp_path):
    vol = volume_factory("broken")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    config = write_config(tmp_path, broken_helper, {"j": {"volumes": [vol]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    assert "exited 2" in proc.stderr and "Input/output error" in proc.stderr
    [entry] = listing(config)
    assert entry["status"] == "failed"
    assert entry["artifacts"][0]["destinations"][0]["status"] == "failed"
    assert stored_files(tmp_path) == [], "something was left under the backups directory"
    leftovers = docker_client.containers.list(all=True, filters={"label": "backupd.helper", "volume": vol})
    assert leftovers == []


def test_volumes_selected_by_label_container_and_host_path(
        docker_client, helper_image, volume_factory, tmp_path):
    tag = f"sel{uuid.uuid4().hex[:8]}"
    labelled = []
    for i in range(2):
        name = f"{tag}-{i}"
        docker_client.volumes.create(name, labels={"backupd-test": "1", "team": tag})
        (mountpoint(docker_client, name) / "f").write_text(str(i))
        labelled.append(name)
    mounted = volume_factory("mounted")
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (host_dir / "h.txt").write_text("host file")
    app = docker_client.containers.create(helper_image, APP_COMMAND,
                                          volumes={mounted: {"bind": "/m", "mode": "rw"}},
                                          tmpfs={"/scratch": ""}, name=f"sel-{tag}")
    try:
        config = write_config(tmp_path, helper_image, {"j": {"volumes": [
            {"label": f"team={tag}"}, {"container": app.name}, {"path": str(host_dir), "as": "hostdir"}]}})
        proc = backupd(config, "backup", "j", check=True)
        assert "skipping tmpfs mount /scratch" in proc.stderr
        [entry] = listing(config)
        assert sorted(a["name"] for a in entry["artifacts"]) == sorted(labelled + [mounted, "hostdir"])
        backup_id = entry["id"]
        target = f"{tag}-restored"
        backupd(config, "restore", backup_id, "--volume", "hostdir", "--to-volume", target, check=True)
        assert (mountpoint(docker_client, target) / "h.txt").read_text() == "host file"
        docker_client.volumes.get(target).remove()
        proc = backupd(config, "restore", backup_id, "--volume", "hostdir")
        assert proc.returncode == 2 and "pass --to-volume" in proc.stderr
    finally:
        app.remove(force=True)
        for name in labelled:
            docker_client.volumes.get(name).remove(force=True)


def test_label_matching_nothing_is_an_error(helper_image, tmp_path):
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [{"label": "nobody=" + uuid.uuid4().hex}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 2 and "jobs.j.volumes[0]: no volume matches label" in proc.stderr


def test_corrupted_copy_is_refused_before_anything_is_written(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("corrupt")
    (mountpoint(docker_client, vol) / "a").write_bytes(os.urandom(100_000))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    [archive] = archives(tmp_path)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    target = f"{vol}-never"
    proc = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target)
    assert proc.returncode != 0
    assert "does not match the catalog" in proc.stderr or "corrupt" in proc.stderr
    assert target not in [v.name for v in docker_client.volumes.list()]


def test_a_copy_bad_midway_is_undone_and_the_next_copy_restores(
        docker_client, helper_image, volume_factory, tmp_path):
    """Restore reads a copy once, proving each 4 MiB block before it writes it."""
    vol = volume_factory("midway")
    data = os.urandom(14 << 20)  # incompressible: four blocks stored
    (mountpoint(docker_client, vol) / "big.bin").write_bytes(data)
    destinations = {name: {"type": "local", "path": str(tmp_path / "backups" / name)} for name in ("one", "two")}
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "destinations": ["one", "two"]}},
                          destinations=destinations)
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    one, two = sorted(archives(tmp_path))
    assert "/one/" in str(one) and "/two/" in str(two)

    def corrupt(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(9 << 20)  # block 2: blocks 0 and 1 reach tar before the bad one is found
            byte = f.read(1)
            f.seek(9 << 20)
            f.write(bytes([byte[0] ^ 0xFF]))

    corrupt(one)
    target = f"{vol}-from-two"
    try:
        proc = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target)
        assert proc.returncode == 0, proc.stderr
        assert "copy on one unusable" in proc.stderr and "block 2 (bytes from 8388608)" in proc.stderr
        assert (mountpoint(docker_client, target) / "big.bin").read_bytes() == data
    finally:
        docker_client.volumes.get(target).remove(force=True)

    corrupt(two)
    new = f"{vol}-never"
    proc = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", new)
    assert proc.returncode == 1 and "no good copy" in proc.stderr and proc.stderr.count("block 2") >= 2
    assert new not in [v.name for v in docker_client.volumes.list()]  # the half-restored volume is gone
    empty = volume_factory("empty")
    proc = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", empty)
    assert proc.returncode == 1
    assert list(mountpoint(docker_client, empty).iterdir()) == []  # an empty target is left empty


def test_helpers_work_within_a_memory_limit_smaller_than_the_volume(
        docker_client, helper_image, volume_factory, tmp_path):
    """The limit holds the helper's page cache: 300 MB pass through a 64 MiB helper both ways."""
    from docker.types import Mount

    from backupd.docker_host import DockerHost

    vol = volume_factory("memory")
    data = os.urandom(300 << 20)
    (mountpoint(docker_client, vol) / "big.bin").write_bytes(data)
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, helper_memory="64m")
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    target = f"{vol}-restored"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        restored = (mountpoint(docker_client, target) / "big.bin").read_bytes()
        assert hashlib.sha256(restored).digest() == hashlib.sha256(data).digest()
    finally:
        docker_client.volumes.get(target).remove(force=True)

    host = DockerHost(docker_client, helper_image, 64 << 20)
    cid = host._create_helper(["true"], [Mount("/data", vol, type="volume")], purpose="test")
    try:
        assert docker_client.api.inspect_container(cid)["HostConfig"]["Memory"] == 64 << 20
    finally:
        host._remove(cid)


def test_malicious_archive_is_refused_and_nothing_is_created(docker_client, helper_image, tmp_path):
    """An attacker with write access to a destination swaps in an archive that escapes."""
    from backupd.catalog import Catalog

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("./etc")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
        evil = tarfile.TarInfo("./etc/cron.d/evil")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"boom"))
    stored = zstandard.ZstdCompressor().compress(buf.getvalue())
    config = write_config(tmp_path, helper_image, {"j": {"volumes": ["whatever"]}})
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    backup_id = catalog.start_backup("j")
    key = f"j/{backup_id}/volume-evil.tar.zst"
    (tmp_path / "backups" / key).parent.mkdir(parents=True)
    (tmp_path / "backups" / key).write_bytes(stored)
    art = catalog.add_artifact(backup_id, "volume", "evil", "volume:evil", "zstd", None, {"local": key})
    catalog.finish_artifact(art, len(stored), hashlib.sha256(stored).hexdigest(), {})
    catalog.finish_backup(backup_id)
    target = f"evil-{uuid.uuid4().hex[:8]}"
    proc = backupd(config, "restore", backup_id, "--volume", "evil", "--to-volume", target)
    assert proc.returncode == 4
    assert "unsafe archive" in proc.stderr and "/etc" in proc.stderr
    assert target not in [v.name for v in docker_client.volumes.list()]


def test_sigterm_mid_backup_leaves_no_archive_no_helper_and_a_failed_record(
        docker_client, helper_image, volume_factory, tmp_path):
    import signal
    import time

    vol = volume_factory("sigterm")
    with open(mountpoint(docker_client, vol) / "big.bin", "wb") as f:
        for _ in range(400):
            f.write(os.urandom(1 << 20))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "backup", "j"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while sum(p.stat().st_size for p in (tmp_path / "backups").rglob(".*partial*")) < 4 << 20:
        assert proc.poll() is None and time.monotonic() < deadline, "backup never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)  # read while waiting: a full stderr pipe would block the process
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"backupd did not exit within 60 s of SIGTERM; its log:\n{proc.communicate()[1][-3000:]}")
    assert proc.returncode == 130, err[-2000:]
    assert stored_files(tmp_path) == [], "a partial or final file was left behind"
    [entry] = listing(config)
    assert entry["status"] == "failed" and "interrupted" in entry["error"]
    assert docker_client.containers.list(all=True, filters={"label": "backupd.helper", "volume": vol}) == []


def test_sigterm_mid_restore_into_a_new_volume_leaves_no_volume_and_no_helper(
        docker_client, helper_image, volume_factory, tmp_path):
    """Ctrl-C or SIGTERM while a restore writes: the half-restored new volume, which would look
    whole, is removed, with its helper; the process exits 130."""
    import signal
    import time

    from docker.errors import NotFound

    vol = volume_factory("sigrestore")
    with open(mountpoint(docker_client, vol) / "big.bin", "wb") as f:
        for _ in range(400):
            f.write(os.urandom(1 << 20))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    target = f"{vol}-restored"

    def restored_bytes() -> int:
        try:
            return (mountpoint(docker_client, target) / "big.bin").stat().st_size
        except (NotFound, FileNotFoundError):
            return 0

    proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "restore", backup_id,
                             "--volume", vol, "--to-volume", target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while restored_bytes() < 4 << 20:
            assert proc.poll() is None and time.monotonic() < deadline, "the restore never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"backupd did not exit within 60 s of SIGTERM; its log:\n{proc.communicate()[1][-3000:]}")
        assert proc.returncode == 130, err[-2000:]
        assert target not in {v.name for v in docker_client.volumes.list()}, "a half-restored volume was left"
        helpers = docker_client.containers.list(all=True, filters={"label": "backupd.helper"})
        assert not [c for c in helpers if any(m.get("Name") in (vol, target) for m in c.attrs["Mounts"])]
    finally:
        remove_volume(docker_client, target)  # made by the restore, if the test failed


def test_helpers_leave_no_anonymous_volumes_behind(docker_client, helper_image, volume_factory, tmp_path):
    """A helper image that declares VOLUMEs (backupd's own does) gets anonymous volumes with every
    helper; removing the helper must remove them, or each backup and restore leaves two behind."""
    ctx = tmp_path / "image"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {helper_image}\nVOLUME [\"/var/lib/backupd\", \"/backups\"]\n")
    image = f"backupd-helper-with-volumes:{uuid.uuid4().hex[:8]}"
    docker_client.images.build(path=str(ctx), tag=image, rm=True, forcerm=True)
    try:
        vol = volume_factory("anon")
        (mountpoint(docker_client, vol) / "a.txt").write_text("one")
        config = write_config(tmp_path, image, {"j": {"volumes": [vol]}})
        before = {v.name for v in docker_client.volumes.list()}

        def left_behind() -> set[str]:
            """New anonymous volumes (64 hex digits) that nothing uses: what a leaking helper leaves.
            Other tests may run alongside, so named and in-use volumes do not count."""
            dangling = docker_client.volumes.list(filters={"dangling": True})
            return {v.name for v in dangling if re.fullmatch(r"[0-9a-f]{64}", v.name)} - before

        backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
        copy = f"{vol}-copy"
        try:
            backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", copy, check=True)
            assert (mountpoint(docker_client, copy) / "a.txt").read_text() == "one"
        finally:
            docker_client.volumes.get(copy).remove(force=True)
        assert left_behind() == set()
    finally:
        docker_client.images.remove(image, force=True)
