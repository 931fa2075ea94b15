"""An error after which a service cannot go on: said once, plainly, and the process exits 1."""


class Fatal(Exception):
    """Raised out of a service's main coroutine: `fabric.runner` logs the message, no traceback."""
