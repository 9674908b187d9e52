"""Build tar archives byte by byte, hostile ones included, for the tar guard's tests."""

from __future__ import annotations

BLOCK = 512
POSIX_MAGIC = b"ustar\x0000"
OLD_GNU_MAGIC = b"ustar  \x00"


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(name: bytes | str, kind: bytes = b"0", size: int | bytes = 0, link: bytes | str = b"",
           magic: bytes = POSIX_MAGIC, prefix: bytes = b"", checksum: bytes | None = None) -> bytes:
    """One header block; `size` as a number (written in octal) or as the raw 12-byte field."""
    name = name.encode() if isinstance(name, str) else name
    link = link.encode() if isinstance(link, str) else link
    size_field = size if isinstance(size, bytes) else octal(size, 12)
    block = bytearray(BLOCK)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = octal(0o644, 8)
    block[108:116] = octal(0, 8)
    block[116:124] = octal(0, 8)
    block[124:136] = size_field[:12].ljust(12, b"\0")
    block[136:148] = octal(0, 12)
    block[148:156] = b" " * 8
    block[156:157] = kind[:1] or b"\0"
    block[157:257] = link[:100].ljust(100, b"\0")
    block[257:265] = magic
    block[345:500] = prefix[:155].ljust(155, b"\0")
    block[148:156] = checksum if checksum is not None else b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: bytes | str, kind: bytes = b"0", data: bytes = b"", link: bytes | str = b"",
           **fields: object) -> bytes:
    return header(name, kind, len(data), link, **fields) + pad(data)  # type: ignore[arg-type]


def record(key: str | bytes, value: str | bytes) -> bytes:
    """One well-formed PAX record."""
    body = b" " + (key.encode() if isinstance(key, str) else key) + b"=" + \
        (value.encode() if isinstance(value, str) else value) + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(records: bytes, kind: bytes = b"x") -> bytes:
    """An extended header holding these raw record bytes."""
    return member(b"./PaxHeaders/x", kind, records)


def long_name(name: bytes | str, kind: bytes = b"L") -> bytes:
    name = name.encode() if isinstance(name, str) else name
    return member(b"././@LongLink", kind, name + b"\0", magic=OLD_GNU_MAGIC)


def end() -> bytes:
    return bytes(2 * BLOCK)


def archive(*parts: bytes) -> bytes:
    return b"".join(parts) + end()
