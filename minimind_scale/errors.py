"""Error types that map to exit codes: a user's mistake exits 2 with one readable message."""


class UserError(Exception):
    """A mistake in the user's config, command line or data. Printed without a traceback; exit code 2."""


class RecordError(ValueError):
    """One data record is malformed. `field` names the offending key (dotted path), `reason` says why.

    The data pipeline adds the file and line, so stage code only describes the record itself.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops without saving. Exit code 1."""
