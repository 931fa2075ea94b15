"""Which hetfaas a process is, and which wire contract it speaks.

WIRE counts incompatible changes of the msgspec Structs between processes (a field removed or
retyped, a tag renamed); adding a field with a default is compatible and changes nothing. Every
registration states both, so a rolling upgrade can be watched in `hetfaas status`, and a
scheduler places nothing on a node that speaks another contract (it could not decode the node's
answers, nor the node its requests)."""

from importlib import metadata

WIRE = 1


def release() -> str:
    try:
        return metadata.version("hetfaas")
    except metadata.PackageNotFoundError:  # run from a source tree without installing it
        return "unknown"
