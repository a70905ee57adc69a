"""A generation backend that breaks mid-answer, for the tests of what `serve` says when generation fails.

`failing_hf` is the default hf backend whose every generation streams its first FAIL_AFTER_TOKENS tokens and
then raises RuntimeError("injected failure"); an answer that ends sooner raises when it ends. Load it with
`--plugin tests/plugins/failing_backend.py --generation_backend failing_hf`.
"""
from minimind_scale.generation.hf import HFBackend
from minimind_scale.generation.registry import register_backend

BACKEND_NAME = "failing_hf"
FAIL_AFTER_TOKENS = 6
FAILURE_MESSAGE = "injected failure"


class _FailAfter:
    """A TokenStream that passes tokens on to `stream` and raises once `limit` of them have gone through."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.seen = stream, limit, 0

    def put(self, token_ids: list[int]) -> None:
        self.stream.put(token_ids)
        self.seen += len(token_ids)
        if self.seen >= self.limit:
            raise RuntimeError(FAILURE_MESSAGE)

    def end(self) -> None:
        self.stream.end()


class FailingHFBackend(HFBackend):
    """HFBackend whose generations fail after a few tokens (streamed ones after streaming them)."""

    def generate(self, prompts, params, *, seeds=None, stream=None, should_stop=None):
        watched = None if stream is None else _FailAfter(stream, FAIL_AFTER_TOKENS)
        super().generate(prompts, params, seeds=seeds, stream=watched, should_stop=should_stop)
        raise RuntimeError(FAILURE_MESSAGE)  # it ended before the limit: fail all the same


register_backend(BACKEND_NAME, FailingHFBackend)
