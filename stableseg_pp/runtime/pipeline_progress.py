"""One line per step of a run: "step k of N: <step> (elapsed, about T left)", across every stage of the pipeline.

``fit`` plans the run's step count (:func:`stableseg_pp.stages.planned_steps`); every step announces itself when it
opens its folder (:func:`stableseg_pp.runtime.run_dir.open_stage`), finished ones included (they take no time).
The time left is a rough guess: the elapsed time per step started so far, times the steps still to come.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("stableseg_pp.progress")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PipelineProgress:
    """Counts the steps of one run and logs each as it starts (rank 0 logs; the count is the same on every rank)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.started = 0
        self.since = time.perf_counter()

    def plan(self, total: int) -> None:
        """A new run of ``total`` steps starts now."""
        self.total, self.started, self.since = max(1, int(total)), 0, time.perf_counter()

    def step(self, name: str) -> str | None:
        """Step ``name`` starts: log where the run is; returns the line (None outside a planned run)."""
        if self.total is None:
            return None
        self.started += 1
        self.total = max(self.total, self.started)
        elapsed = time.perf_counter() - self.since
        line = f"step {self.started} of {self.total}: {name} (elapsed {_clock(elapsed)}"
        if self.started > 1:
            left = elapsed / (self.started - 1) * (self.total - self.started + 1)
            line += f", about {_clock(left)} left"
        line += ")"
        log.info("%s", line)
        return line

    def finish(self) -> None:
        if self.total is not None:
            log.info("all %d steps done in %s", self.started, _clock(time.perf_counter() - self.since))
        self.total = None


PROGRESS = PipelineProgress()
