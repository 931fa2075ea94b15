"""Keys and values as `hetfaas maps set` takes them, read against the map's shape."""

import pytest

from ebpf_runtime.map_text import encode


def test_numbers_are_little_endian_in_the_fields_size() -> None:
    assert encode("42", 4, "value") == b"\x2a\0\0\0"
    assert encode("-1", 8, "value") == b"\xff" * 8
    assert encode("0x0a000001", 4, "key") == bytes([10, 0, 0, 1]), "hex bytes as written"


def test_prefixes_are_lpm_keys() -> None:
    assert encode("10.1.2.3/16", 8, "key", lpm=True) == (16).to_bytes(4, "little") + bytes([10, 1, 0, 0])
    assert encode("2001:db8::/32", 20, "key", lpm=True)[:6] == (32).to_bytes(4, "little") + b"\x20\x01"


@pytest.mark.parametrize(
    ("text", "size", "lpm", "says"),
    [
        ("256", 1, False, "does not fit in the map's 1-byte value"),
        ("0x0102", 4, False, "is 2 bytes; the map's value is 4 bytes"),
        ("0xzz", 1, False, "hex bytes"),
        ("ten", 4, False, "expected a number, 0x and hex bytes"),
        ("10.0.0.0/8", 20, True, "16 bytes of address, not 4"),
        ("10.0.0.0/40", 8, True, "10.0.0.0/40"),
    ],
)
def test_what_does_not_fit_says_what_was_expected(text: str, size: int, lpm: bool, says: str) -> None:
    with pytest.raises(ValueError, match=None) as refused:
        encode(text, size, "value", lpm=lpm)
    assert says in str(refused.value)
