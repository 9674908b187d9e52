"""Redis: the server's own RDB snapshot, streamed; and putting dump.rdb back.

`redis-cli --rdb -` asks the server for a snapshot the way a replica does
(the server forks and writes one moment of its data set) and writes it to
stdout, so it goes through the same compress/hash/ship path as every other
dump, nothing staged on the server's disk. The password travels as
REDISCLI_AUTH in the environment, never in argv; it comes from the entry's
password_file or the container's REDIS_PASSWORD.

Restore stops the container (Redis saves its data set on shutdown, so the
file can only be replaced after that), puts the dump where the server's
`dir` and `dbfilename` say, under a temporary name renamed into place, and
starts it again, which loads it. A server with `appendonly yes` would load
its append-only file instead and ignore the dump: that is refused.
"""

from __future__ import annotations

import re

from backupd.config import DatabaseSpec

KIND = "redis"
PASSWORD_VARS = ("REDIS_PASSWORD",)
SYSTEM_DATABASES: frozenset[str] = frozenset()
TOOL_CANDIDATES = {"cli": ("redis-cli",)}
# What redis-cli --rdb says on stderr when all goes well: not worth a warning per run.
PROGRESS = re.compile(r"^(sending REPLCONF (capa eof|rdb-only 1)|SYNC sent to master, .*|"
                      r"Transfer finished with success.*)$")
# Write the file as the owner of its directory (the server's user), whatever the helper runs as.
RESTORE_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER")
# sh, cat, stat, chown, chmod, sync, mv: what every helper image (busybox included) has.
PUT_FILE = r'''
set -eu
dir=${1%/*}
tmp="$dir/.backupd-restore-$$.rdb"
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
chown "$(stat -c %u:%g "$dir")" "$tmp"
chmod 0600 "$tmp"
sync
mv -f "$tmp" "$1"
trap - EXIT
'''


def password_env(password: str | None) -> dict[str, str]:
    return {"REDISCLI_AUTH": password} if password else {}


def conn(spec: DatabaseSpec) -> list[str]:
    args = ["redis-cli", "--no-auth-warning"]
    if spec.host:
        args += ["-h", spec.host, "-p", str(spec.port or 6379)]
    if spec.user:
        args += ["--user", spec.user]
    return args


def dump_everything(spec: DatabaseSpec, tools: dict[str, str]) -> list[str]:
    return [*conn(spec), *spec.options, "--rdb", "-"]


def query(spec: DatabaseSpec, *words: str) -> list[str]:
    """A command whose raw reply is one value per line."""
    return [*conn(spec), "--raw", *words]


def put_file(path: str) -> list[str]:
    return ["sh", "-c", PUT_FILE, "sh", path]
