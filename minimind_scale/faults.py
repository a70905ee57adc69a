"""Stopping cleanly on SIGTERM/SIGINT, and the fault-injection switches the robustness tests use.

Preemptible clusters send SIGTERM and then, a grace period later, SIGKILL. The handler only records
the request; the loop saves a checkpoint at the next optimizer-step boundary (all ranks agree
first, so they save together) and exits 0.
"""
from __future__ import annotations

import os
import signal

import torch

# Test switches (environment variables), read once: seconds to sleep after each step, so a test can
# kill a sub-second run between checkpoints; and a step whose loss is made NaN.
STEP_DELAY = float(os.environ.get("MINIMIND_SCALE_TEST_STEP_DELAY", "0"))
NAN_AT_STEP = int(os.environ.get("MINIMIND_SCALE_TEST_NAN_AT_STEP", "0"))


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)

    def _record(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank was asked to stop."""
        mine = 1.0 if self.signal_name else 0.0
        if accelerator.num_processes == 1:
            return bool(mine)
        t = torch.tensor([mine], device=accelerator.device)
        return bool(accelerator.reduce(t, reduction="max").item())
