"""Exclude patterns: anchored at the volume's root, refused when unsafe, never read as options."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from backupd.config import parse_config
from backupd.docker_host import TAR_CREATE, tar_create
from backupd.errors import ConfigError
from backupd.excludes import merged, normalize, tar_args


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


def test_excludes_with_repository_mode_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"jobs\.j\.exclude: excludes are not supported with format: repository"):
        parse_config({"jobs": {"j": {"format": "repository", "repository_password": "pw",
                                     "volumes": [{"name": "v", "exclude": ["tmp"]}]}}}, "c", env={})
