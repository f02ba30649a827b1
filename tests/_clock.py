"""A virtual clock for testing latency logic without timing anything.

``FakeClock.install(monkeypatch, module)`` replaces ``module.time`` (the module the code under
test reads ``time.perf_counter`` from) by the clock; :class:`Costly` models advance it by planted
costs instead of computing. The results are then exact and do not depend on the machine's load:
speed belongs in benchmarks, the tests check what is done with the timings.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch.nn as nn

#: A cost unit that is a power of two, so sums and ratios of planted costs are exact floats.
UNIT = 2.0**-10


class FakeClock:
    """``perf_counter()`` returns ``now``; only :class:`Costly` forwards move it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def install(self, monkeypatch, module) -> FakeClock:
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=self.perf_counter))
        return self


class Costly(nn.Module):
    """A model whose forward costs ``cost(batch_size, call_index)`` seconds of the fake clock.

    ``call_index`` counts this model's forwards from 0 (warm-up and calibration runs included).
    """

    def __init__(self, clock: FakeClock, cost: Callable[[int, int], float]) -> None:
        super().__init__()
        self.clock, self.cost, self.calls = clock, cost, 0
        self.lin = nn.Linear(1, 1)  # a parameter, as a real model has (its device is read)

    def forward(self, x):
        self.clock.now += self.cost(int(x.shape[0]), self.calls)
        self.calls += 1
        return x
