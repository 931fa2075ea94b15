"""Keys and values of `hetfaas maps set|delete` as people type them, read against the map's
shape. Pure: text and a size in, the bytes out, or a ValueError that says what was expected.

    42            a number, little-endian in the field's size (counters, ports, ifindexes)
    0x0a000001    bytes, as written (exactly the field's size)
    10.1.0.0/16   an LPM trie key: the prefix length (u32), then the address (IPv4 or IPv6)"""

import ipaddress

LPM_TRIE = 11


def encode(text: str, size: int, what: str, lpm: bool = False) -> bytes:
    text = text.strip()
    if lpm and "/" in text:
        return _prefix(text, size, what)
    if text.lower().startswith("0x"):
        try:
            data = bytes.fromhex(text[2:])
        except ValueError:
            raise ValueError(f"{what} {text!r}: 0x must be followed by hex bytes (two digits each)") from None
        if len(data) != size:
            raise ValueError(f"{what} {text!r} is {len(data)} bytes; the map's {what} is {size} bytes")
        return data
    try:
        number = int(text, 10)
    except ValueError:
        forms = "a number, 0x and hex bytes" + (", or a prefix such as 10.0.0.0/8" if lpm else "")
        raise ValueError(f"{what} {text!r}: expected {forms}") from None
    try:
        return number.to_bytes(size, "little", signed=number < 0)
    except OverflowError:
        raise ValueError(f"{what} {number} does not fit in the map's {size}-byte {what}") from None


def _prefix(text: str, size: int, what: str) -> bytes:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"{what} {text!r}: {exc}") from None
    address = network.network_address.packed
    if 4 + len(address) != size:
        raise ValueError(
            f"{what} {text!r}: this trie's keys are {size - 4} bytes of address, not {len(address)}"
        )
    return network.prefixlen.to_bytes(4, "little") + address
