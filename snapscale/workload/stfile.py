"""The layout of a safetensors file: which byte range of the file holds which tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range in the data section, then the data. Reading the header ourselves (the
safetensors package does not expose the ranges) lets the library copy each tensor's bytes straight
from the file into its arena and record where they came from. Standard library only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass

from snapscale.workload.errors import WeightsError

# Bytes per element of each safetensors dtype name.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class StTensor:
    name: str
    dtype: str  # a DTYPE_BYTES key
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def parse_header(header: bytes, data_start: int, file_size: int, where: str = "header") -> list[StTensor]:
    """The tensors a header describes, in file order. Pure; a bad header is a `WeightsError` naming
    the tensor and field."""
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(where, f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise WeightsError(where, f"expected a JSON object, got {type(doc).__name__}")
    out: list[StTensor] = []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        at = f"{where}.{name}"
        if not isinstance(info, dict):
            raise WeightsError(at, "expected an object with dtype, shape and data_offsets")
        dtype = info.get("dtype")
        if dtype not in DTYPE_BYTES:
            raise WeightsError(f"{at}.dtype", f"unknown dtype {dtype!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WeightsError(f"{at}.shape", f"expected a list of non-negative integers, got {shape!r}")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise WeightsError(f"{at}.data_offsets", f"expected [begin, end], got {offs!r}")
        begin, end = offs
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if begin < 0 or end - begin != nbytes:
            raise WeightsError(
                f"{at}.data_offsets", f"[{begin}, {end}] does not hold {nbytes} bytes of {dtype}{shape}"
            )
        if data_start + end > file_size:
            why = f"ends at {data_start + end}, past the file's {file_size} bytes"
            raise WeightsError(f"{at}.data_offsets", why)
        out.append(StTensor(name, dtype, tuple(shape), data_start + begin, nbytes))
    out.sort(key=lambda t: (t.start, t.name))
    for a, b in itertools.pairwise(out):
        if a.start + a.nbytes > b.start:
            raise WeightsError(f"{where}.{b.name}.data_offsets", f"overlaps {a.name}")
    return out


def read_layout(path: str) -> list[StTensor]:
    """The tensors of the safetensors file at `path`, in file order."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise WeightsError(path, f"cannot open: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise WeightsError(path, f"{size} bytes: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise WeightsError(path, f"header length {n} does not fit a {size}-byte safetensors file")
        header = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    return parse_header(header, 8 + n, size, where=path)
