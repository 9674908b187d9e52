"""Names from outside (database names above all) made safe for object keys, reversibly.

A database may be called anything its server allows: `a/b`, `it's`, `..`,
`two words`, a newline. Keys and catalog sources carry such a name in an
encoded form: ASCII letters, digits, `_ . - $` and printable non-ASCII
characters stay as they are (so the plain names every earlier backup used
keep their keys), every other character becomes the %XX escapes of its UTF-8
bytes. `%` itself is escaped, so the encoding is one-to-one and reversible,
and an encoded name never holds `/`, `*`, whitespace or control characters.
"""

from __future__ import annotations

import string
from urllib.parse import unquote_to_bytes

KEEP = frozenset(string.ascii_letters + string.digits + "_.-$")


def unquotable(name: str) -> str | None:
    """Why no tool can be handed `name` as a plain value, or None if it can."""
    if not name:
        return "it is empty"
    if "\0" in name:
        return "it contains a NUL byte"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode"
    return None


def encode_name(name: str) -> str:
    """`two words` -> `two%20words`, `a/b` -> `a%2Fb`; `app_1` and `zażółć` unchanged."""
    return "".join(
        ch if ch in KEEP or (not ch.isascii() and ch.isprintable())
        else "".join(f"%{byte:02X}" for byte in ch.encode("utf-8"))
        for ch in name)


def decode_name(encoded: str) -> str:
    """The inverse of encode_name (raises UnicodeDecodeError on escapes that are not UTF-8)."""
    return unquote_to_bytes(encoded).decode("utf-8")
