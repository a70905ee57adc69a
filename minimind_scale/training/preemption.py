"""Stopping cleanly on SIGTERM/SIGINT.

Preemptible clusters send SIGTERM and then, a grace period later, SIGKILL. The handler only records
the request; the loop saves a checkpoint at the next optimizer-step boundary (all ranks agree
first, so they save together) and exits 0.
"""
from __future__ import annotations

import signal

import torch


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
