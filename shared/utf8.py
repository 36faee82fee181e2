"""UTF-8 boundaries: a token's bytes may end inside a character, so text is held back until whole."""
from __future__ import annotations


def complete_prefix_len(data: bytes | bytearray) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character.

    Only the last (at most 3) bytes are inspected; bytes that can never start a character
    (stray continuation bytes, invalid lead bytes) are let through, since waiting would not
    complete them.
    """
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:  # ASCII: everything up to here is whole
            return n
        if b >= 0xC0:  # lead byte: is its sequence complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 1
            return n if back >= need else n - back
    return n


def starts_mid_character(data: bytes) -> bool:
    """True if ``data`` begins with a UTF-8 continuation byte."""
    return bool(data) and 0x80 <= data[0] < 0xC0


def common_prefix_len(a: bytes | bytearray | list[int], b: bytes | bytearray | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
