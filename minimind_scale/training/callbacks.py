"""Engine callbacks: code a plugin file installs to watch (or perturb) a run without editing the loop.

A plugin file (``--plugin FILE.py`` or ``$MINIMIND_SCALE_PLUGINS``) calls ``register_callback(MyCallback())``;
the engine calls every registered callback at fixed points of each optimizer step. The fault-injection
tests use this to make a step's loss NaN or to slow steps down, so the production loop holds no test switch.
"""
from __future__ import annotations


class Callback:
    """Override the hooks you need; each gets the run (engine.Run) first."""

    def on_micro_batch_loss(self, run, output) -> None:
        """After a micro-batch's loss (a LossOutput) is computed, before its backward."""

    def on_step_end(self, run, result) -> None:
        """After an optimizer step (result: engine.StepResult) has been applied and logged."""


_CALLBACKS: list[Callback] = []


def register_callback(callback: Callback) -> Callback:
    if not isinstance(callback, Callback):
        raise TypeError(f"register_callback expects a Callback, got {type(callback).__name__}")
    if callback not in _CALLBACKS:
        _CALLBACKS.append(callback)
    return callback


def registered_callbacks() -> list[Callback]:
    return list(_CALLBACKS)
