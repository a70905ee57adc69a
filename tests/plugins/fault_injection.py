"""Fault injection for the robustness tests, installed as engine callbacks through the plugin mechanism.

tests/conftest.py loads this file (via $MINIMIND_SCALE_PLUGINS) whenever a test sets one of:
  MINIMIND_SCALE_TEST_STEP_DELAY=SECONDS  sleep after every optimizer step, so a test can kill a
                                          sub-second run between two checkpoints;
  MINIMIND_SCALE_TEST_NAN_AT_STEP=N       make every micro-batch loss of optimizer step N NaN.
"""
import os
import time

from minimind_scale import Callback, register_callback


class DelayEachStep(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, run, result) -> None:
        time.sleep(self.seconds)


class NanLossAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_micro_batch_loss(self, run, output) -> None:
        if run.state.step + 1 == self.step:
            output.loss_sum = output.loss_sum * float("nan")


if float(os.environ.get("MINIMIND_SCALE_TEST_STEP_DELAY", "0")) > 0:
    register_callback(DelayEachStep(float(os.environ["MINIMIND_SCALE_TEST_STEP_DELAY"])))
if int(os.environ.get("MINIMIND_SCALE_TEST_NAN_AT_STEP", "0")) > 0:
    register_callback(NanLossAtStep(int(os.environ["MINIMIND_SCALE_TEST_NAN_AT_STEP"])))
