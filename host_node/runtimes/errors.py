from schemas.errors import ErrorCode


class FunctionFailed(Exception):
    """An invocation ended without output; becomes an ErrorReply with this code."""

    def __init__(self, code: ErrorCode, message: str, detail: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
