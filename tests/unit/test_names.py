"""Names from outside become object keys and catalog sources reversibly, one path part each,
and plain names keep the keys earlier backups used."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backupd.artifact import artifact_key
from backupd.names import decode_name, encode_name, unquotable
from backupd.storage.base import check_key

HOSTILE = ["two words", "a/b", "it's", "back\\slash", "..", ".", "-x", "--help", "*all", "*globals",
           "50%off", "a%2Fb", "host=127.0.0.1 port=5432", "postgresql://evil:5432/x", "new\nline",
           "tab\there", "a`b", 'dq"', "zażółć 日本語 🐘", "\u202eevil", "nbsp\u00a0x", "~user", "x" * 63]

# Anything a server could hold: every character but NUL and lone surrogates.
NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1)


@pytest.mark.parametrize("name", ["app", "shop_2", "My.DB-1", "price$", "pg.app", "zażółć", "日本語"])
def test_plain_names_are_unchanged_so_existing_keys_stay_valid(name):
    assert encode_name(name) == name
    assert artifact_key("j", "20240101-000000-abcd", "database", name, ".dump.zst") == \
        f"j/20240101-000000-abcd/database-{name}.dump.zst"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_round_trip_as_one_safe_path_part(name):
    encoded = encode_name(name)
    assert decode_name(encoded) == name
    assert not set(encoded) & set("/\\*\0\n\t '\"`")
    assert re.fullmatch(r"(?:[^%]|%[0-9A-F]{2})*", encoded)  # '%' only in escapes
    assert all(ch.isprintable() and not ch.isspace() for ch in encoded)
    key = artifact_key("j", "id", "database", f"pg.{name}", ".dump.zst")
    assert check_key(key) == key and key.count("/") == 2


def test_spaces_slashes_and_percent_are_escaped_as_utf8_bytes():
    assert encode_name("two words") == "two%20words"
    assert encode_name("a/b") == "a%2Fb"
    assert encode_name("50%off") == "50%25off"
    assert encode_name("*all") == "%2Aall"
    assert encode_name("\u202e") == "%E2%80%AE"  # an invisible direction override is not kept raw


@given(NAMES)
def test_every_name_round_trips(name):
    assert decode_name(encode_name(name)) == name


@given(NAMES, NAMES)
def test_different_names_never_share_a_key(a, b):
    if a != b:
        assert encode_name(a) != encode_name(b)


@given(NAMES)
def test_every_name_is_one_valid_key_part(name):
    key = artifact_key("job", "id", "database", f"pg.{name}", ".dump.zst")
    assert check_key(key) == key and key.split("/")[:2] == ["job", "id"] and len(key.split("/")) == 3


@pytest.mark.parametrize("name,reason", [("", "empty"), ("a\0b", "NUL"), ("\udc80", "not valid Unicode")])
def test_names_no_tool_can_take_are_named_with_the_reason(name, reason):
    assert reason in unquotable(name)


def test_ordinary_hostile_names_are_quotable():
    assert all(unquotable(n) is None for n in HOSTILE)
