"""Exclude patterns: anchored at the volume's root, refused when unsafe, never read as options."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backupd.config import parse_config
from backupd.docker_host import TAR_CREATE, tar_create
from backupd.errors import ConfigError
from backupd.excludes import merged, normalize, restic_args, restic_pattern, tar_args


@pytest.mark.parametrize("given, recorded", [
    ("cache/*", "cache/*"), ("tmp/", "tmp"), ("./tmp//", "tmp"), ("-rf", "-rf"),
    ("--to-command=sh", "--to-command=sh"), ("a b/*.log", "a b/*.log"), ("zażółć", "zażółć"),
])
def test_patterns_are_recorded_relative_to_the_volume_root(given: str, recorded: str) -> None:
    assert normalize(given) == recorded


@pytest.mark.parametrize("given, why", [
    ("", "non-empty"), ("/etc", "absolute"), ("a/../../etc", "'..'"), ("..", "'..'"), (".", "the volume itself"),
    ("./", "the volume itself"), ("a\0b", "control character"), ("a\nb", "control character"),
    ("a//b", "empty or '.'"), ("a/./b", "empty or '.'"),
])
def test_unsafe_patterns_are_refused_saying_why(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        normalize(given)


def test_a_pattern_reaches_tar_as_one_exclude_value_that_starts_with_dot_slash() -> None:
    """A leading '-' can never become an option: the value always starts with './'."""
    args = tar_args(["-rf", "--checkpoint-action=exec=sh", "cache/*"])
    assert args == ["--anchored", "--wildcards", "--no-wildcards-match-slash", "--exclude=./-rf",
                    "--exclude=./--checkpoint-action=exec=sh", "--exclude=./cache/*"]
    assert tar_args([]) == []
    command = tar_create(["tmp"])
    assert command[-1] == "." and command[:-1] == [*TAR_CREATE[:-1], *tar_args(["tmp"])]
    assert tar_create() == TAR_CREATE


def test_job_and_volume_patterns_are_merged_once_each_in_order() -> None:
    assert merged(["tmp/", "cache/*"], ["./tmp", "logs"]) == ("tmp", "cache/*", "logs")


def test_gnu_tar_leaves_out_exactly_what_the_patterns_name(tmp_path: Path) -> None:
    """The options backupd builds, given to the real GNU tar over a real tree."""
    root = tmp_path / "vol"
    for path in ("cache/a/f", "cache/x", "tmp/y", "keep/cache/z", "keep/tmp/w", "top.log", "sub/deep.log", "-rf"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    args = tar_args(["cache/*", "tmp/", "*.log", "-rf"])
    listing = subprocess.run(["tar", "--create", "--file=-", "--directory", str(root), *args, "."],
                             capture_output=True, check=True).stdout
    names = set(subprocess.run(["tar", "--list"], input=listing, capture_output=True, check=True)
                .stdout.decode().split())
    assert names == {"./", "./cache/", "./keep/", "./keep/cache/", "./keep/cache/z", "./keep/tmp/",
                     "./keep/tmp/w", "./sub/", "./sub/deep.log"}


def test_config_records_normalized_patterns_and_names_the_key_of_a_bad_one() -> None:
    config = parse_config({"jobs": {"j": {"exclude": ["tmp/"],
                                          "volumes": [{"name": "v", "exclude": ["./cache/*"]}, "w"]}}}, env={})
    assert config.jobs["j"].exclude == ["tmp"]
    assert config.jobs["j"].volumes[0].exclude == ["cache/*"]
    with pytest.raises(ConfigError, match=r"^c: jobs\.j\.volumes\[0\]\.exclude: .*'\.\.'"):
        parse_config({"jobs": {"j": {"volumes": [{"name": "v", "exclude": ["../x"]}]}}}, "c", env={})
    with pytest.raises(ConfigError, match=r"^c: jobs\.j\.exclude: .*absolute"):
        parse_config({"jobs": {"j": {"volumes": ["v"], "exclude": ["/x"]}}}, "c", env={})


@pytest.mark.parametrize("given, restic", [
    ("cache/*", "/data/v/cache/*"), ("tmp/", "/data/v/tmp"), ("*.log", "/data/v/*.log"), ("-rf", "/data/v/-rf"),
    ("a/**/b", "/data/v/a/*/b"), ("**", "/data/v/*"), ("x\\*y", "/data/v/x\\*y"), ("$HOME", "/data/v/$HOME"),
    ("zażółć/ a", "/data/v/zażółć/ a"),
])
def test_a_pattern_reaches_restic_anchored_at_the_volume_with_star_runs_collapsed(given: str, restic: str) -> None:
    assert restic_args([given], "/data/v") == [f"--exclude={restic}"]


def test_the_volume_path_is_matched_literally_by_restic() -> None:
    assert restic_pattern("tmp", "/data/a*b?[c]\\") == "/data/a\\*b\\?\\[c]\\\\/tmp"


@pytest.mark.parametrize("given, why", [
    ("*.sw?", "uses '?'"), ("[ab]*", "uses '\\['"), ("a/b[!x]", "uses '\\['"), ("a\\/b", "escapes nothing"),
    ("a\\", "escapes nothing"),
])
def test_patterns_restic_cannot_match_as_tar_does_are_refused_saying_why(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        restic_pattern(given, "/data/v")


PATTERNS = ["tmp/", "cache/*", "*.log", "-rf", "x\\*y", "a/**/b", "$HOME", "sp ace", "deep/*/*", "*dot*"]
TREE = ["cache/a/f", "cache/x", "tmp/y", "keep/cache/z", "keep/tmp/w", "top.log", "sub/deep.log", "-rf/in",
        "data/real", "x*y", "xzy", "a/b/c/b", "a/q/b", "a/bb", "$HOME", "dir.log/inner", ".hidden.log",
        "zażółć.log", "sp ace/f", "sp acex", "deep/1/2/3.log", "deep/1/f", "deep/top", ".dotdir/f", "nodot"]


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed")
def test_restic_leaves_out_exactly_what_gnu_tar_leaves_out(tmp_path: Path) -> None:
    """The same patterns, given to the real GNU tar and the real restic over one tree."""
    root = tmp_path / "vol"
    for path in TREE:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path)
    listing = subprocess.run(["tar", "--create", "--file=-", "--directory", str(root), *tar_args(PATTERNS), "."],
                             capture_output=True, check=True).stdout
    by_tar = {n.removeprefix("./").rstrip("/") for n in subprocess.run(
        ["tar", "--list"], input=listing, capture_output=True, check=True).stdout.decode().splitlines()} - {"", "."}
    env = {**os.environ, "RESTIC_REPOSITORY": str(tmp_path / "repo"), "RESTIC_PASSWORD": "x",
           "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run(["restic", "init", "--quiet"], env=env, check=True, capture_output=True)
    subprocess.run(["restic", "backup", "--quiet", *restic_args(PATTERNS, str(root)), str(root)], env=env,
                   check=True, capture_output=True)
    listed = subprocess.run(["restic", "ls", "latest"], env=env, check=True, capture_output=True).stdout.decode()
    by_restic = {line.removeprefix(f"{root}/") for line in listed.splitlines() if line.startswith(f"{root}/")}
    assert by_restic == by_tar
    assert "a/q" in by_tar and "a/q/b" not in by_tar and "a/b/c/b" in by_tar and "$HOME" not in by_tar


def test_repository_jobs_take_excludes_and_refuse_untranslatable_ones_naming_the_key() -> None:
    job = {"format": "repository", "repository_password": "pw", "exclude": ["tmp/"],
           "volumes": [{"name": "v", "exclude": ["cache/*", "*.log"]}]}
    config = parse_config({"jobs": {"j": job}}, "c", env={})
    assert config.jobs["j"].volumes[0].exclude == ["cache/*", "*.log"]
    with pytest.raises(ConfigError, match=r"^c: jobs\.j\.volumes\[0\]\.exclude\[1\]: .*'\?'"):
        parse_config({"jobs": {"j": {**job, "volumes": [{"name": "v", "exclude": ["cache/*", "*.sw?"]}]}}},
                     "c", env={})
    with pytest.raises(ConfigError, match=r"^c: jobs\.j\.exclude\[0\]: .*'\['"):
        parse_config({"jobs": {"j": {**job, "exclude": ["[ab]"]}}}, "c", env={})
    # The same patterns are fine for archive mode, whose tar matches them itself.
    parse_config({"jobs": {"j": {"volumes": [{"name": "v", "exclude": ["*.sw?", "[ab]"]}]}}}, "c", env={})
