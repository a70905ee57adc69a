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


class RunFailed(RuntimeError):
    """The run cannot go on, but completed work is safe on disk. Printed without a traceback; exit code 1."""


class NonFiniteLoss(RunFailed):
    """The loss became NaN or infinite; the run stops without saving."""


class PeerLost(RunFailed):
    """Another process of a multi-process run died, so no collective can complete."""


class CheckpointWriteFailed(RunFailed):
    """Writing a checkpoint failed (a full disk, a quota); the partial copy was removed."""
