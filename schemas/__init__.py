"""The wire contract: msgspec Structs, subjects, etcd keys and codecs. No I/O lives here."""
