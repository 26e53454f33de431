"""The protobuf wire format, as far as CRIU's images need it: varints, length-delimited and
fixed-width fields. Pure. CRIU's messages are small and few, so they are read and written here
rather than through protobuf and CRIU's `.proto` files."""

from __future__ import annotations

from collections.abc import Iterator


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; `ValueError` if it is cut off or too long."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint runs past the end")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(msg: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field in order, repeated ones included: an int for varints
    and fixed-width fields, bytes for length-delimited ones."""
    pos = 0
    while pos < len(msg):
        key, pos = varint(msg, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = varint(msg, pos)
            yield num, v
        elif wt == 2:
            n, pos = varint(msg, pos)
            if pos + n > len(msg):
                raise ValueError("field runs past the end")
            yield num, msg[pos : pos + n]
            pos += n
        elif wt in (1, 5):
            width = 8 if wt == 1 else 4
            yield num, int.from_bytes(msg[pos : pos + width], "little")
            pos += width
        else:
            raise ValueError(f"unsupported wire type {wt} of field {num}")


def encode_fields(pairs: list[tuple[int, int]]) -> bytes:
    """Varint fields, in the order given."""
    return b"".join(encode_varint(num << 3) + encode_varint(v) for num, v in pairs)


def raw_fields(msg: bytes) -> Iterator[tuple[int, int | bytes, bytes]]:
    """(field number, value, the field's bytes as encoded, key included) of each field in order:
    what a rewrite keeps byte for byte when it changes only some fields."""
    start = 0
    for num, value in fields(msg):
        _, pos = varint(msg, start)
        if isinstance(value, bytes):
            n, pos = varint(msg, pos)
            end = pos + n
        elif msg[start] & 7 == 0:
            end = varint(msg, pos)[1]
        else:
            end = pos + (8 if msg[start] & 7 == 1 else 4)
        yield num, value, msg[start:end]
        start = end


def encode_bytes_field(num: int, value: bytes) -> bytes:
    """A length-delimited field (a sub-message, a string)."""
    return encode_varint(num << 3 | 2) + encode_varint(len(value)) + value
