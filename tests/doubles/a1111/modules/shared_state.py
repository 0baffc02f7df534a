"""Mirror of modules/shared_state.py (A1111 v1.10.1): the job state flags the samplers read."""

from __future__ import annotations

import time


# modules/shared_state.py: class State
class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    time_start = None

    # modules/shared_state.py: State.interrupt
    def interrupt(self):
        self.interrupted = True

    # modules/shared_state.py: State.skip
    def skip(self):
        self.skipped = True

    # modules/shared_state.py: State.nextjob
    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    # modules/shared_state.py: State.begin(job="(unknown)")
    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job

    # modules/shared_state.py: State.end
    def end(self):
        self.job = ""
        self.job_count = 0
