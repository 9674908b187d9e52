"""Several destinations in repository mode: back up into each repository, or back up into
one and `restic copy` to the others?

Runs restic (the one backupd drives) on the host against three repositories on the same
disk, for the same three runs a job sees: first backup, unchanged, 1% changed. Reports
wall time and bytes read from the volume per approach. The copies in the second approach
happen after the volume is read, so a job with stop_containers would have its containers
back before they start.

    .venv/bin/python benchmarks/repository_copy.py [--size-mib 500] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import MiB, drop_caches, volume_bytes  # run as benchmarks/repository_copy.py: its folder is on the path

REPOS = 3


def restic(repo: Path, password: Path, *args: str, cache: Path, source: Path | None = None) -> str:
    env = {**os.environ, "RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD_FILE": str(password),
           "RESTIC_CACHE_DIR": str(cache)}
    if source is not None:
        env.update(RESTIC_FROM_REPOSITORY=str(source), RESTIC_FROM_PASSWORD_FILE=str(password))
    return subprocess.run(["restic", *args], check=True, capture_output=True, text=True, env=env).stdout


def make_volume(root: Path, size_mib: int, seed: int = 7) -> None:
    """Half incompressible, a third compressible text, the rest small files (one per 50 KiB)."""
    rnd = random.Random(seed)
    (root / "bin").mkdir(parents=True)
    for i in range(max(1, size_mib // 2 // 50)):
        (root / "bin" / f"blob{i}.bin").write_bytes(rnd.randbytes(50 * MiB))
    words = b"backup volume restore docker container archive stream catalog retention error info".split()
    text = b"\n".join(b" ".join(rnd.choice(words) for _ in range(12)) for _ in range(size_mib // 3 * 16000))
    (root / "log.txt").write_bytes(text[: size_mib // 3 * MiB])
    (root / "small").mkdir()
    for i in range(size_mib * 1024 // 6 // 50):
        (root / "small" / f"f{i}.dat").write_bytes(rnd.randbytes(rnd.randint(1, 100) << 10))


def change_one_percent(root: Path, size_mib: int, seed: int) -> None:
    rnd = random.Random(seed)
    (root / f"new{seed}.bin").write_bytes(rnd.randbytes(max(1, size_mib // 100) * MiB))


def run_each(repos: list[Path], pw: Path, cache: Path, src: Path, tag: str) -> float:
    start = time.monotonic()
    for repo in repos:
        restic(repo, pw, "backup", "--quiet", "--host", "bench", "--tag", tag, str(src), cache=cache)
    return time.monotonic() - start


def run_copy(repos: list[Path], pw: Path, cache: Path, src: Path, tag: str) -> tuple[float, float]:
    start = time.monotonic()
    out = restic(repos[0], pw, "backup", "--json", "--quiet", "--host", "bench", "--tag", tag, str(src),
                 cache=cache)
    read_done = time.monotonic()
    snapshot = json.loads(out.strip().splitlines()[-1])["snapshot_id"]
    for repo in repos[1:]:
        restic(repo, pw, "copy", "--quiet", snapshot, cache=cache, source=repos[0])
    return read_done - start, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=500)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backupd-copybench-", dir=args.dir))
    try:
        src = work / "volume"
        make_volume(src, args.size_mib)
        total = volume_bytes(src)
        pw = work / "pw"
        pw.write_text("bench-password\n")
        cache = work / "cache"
        each = [work / f"each{i}" for i in range(REPOS)]
        copy = [work / f"copy{i}" for i in range(REPOS)]
        for repo in each + copy[:1]:
            restic(repo, pw, "init", "--quiet", cache=cache)
        for repo in copy[1:]:  # same chunker parameters: later direct backups still deduplicate
            restic(repo, pw, "init", "--quiet", "--copy-chunker-params", cache=cache, source=copy[0])
        rows = []
        for run, label in enumerate(("first backup", "unchanged", "1% changed")):
            if run == 2:
                change_one_percent(src, args.size_mib, run)
                total = volume_bytes(src)
            drop_caches()
            t_each = run_each(each, pw, cache, src, f"run{run}")
            drop_caches()
            t_read, t_copy = run_copy(copy, pw, cache, src, f"run{run}")
            rows.append((label, t_each, t_copy, t_read))
        print(f"volume {total / MiB:.0f} MiB, {REPOS} repositories on one disk, restic "
              f"{subprocess.run(['restic', 'version'], capture_output=True, text=True).stdout.split()[1]}")
        print(f"{'run':<14} {'backup to each':>15} {'backup + copy':>14} {'volume read (copy)':>19}")
        for label, t_each, t_copy, t_read in rows:
            print(f"{label:<14} {t_each:>13.2f} s {t_copy:>12.2f} s {t_read:>17.2f} s")
        print(f"bytes read from the volume per run: {REPOS}x (backup to each) vs 1x (backup + copy)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
