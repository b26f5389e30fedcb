"""What ``perf.py overhead`` and ``perf.py continual-eval`` share: an Avalanche plugin that counts and times
the work of a run (Avalanche is imported only when the plugin is made)."""

from __future__ import annotations

import time


def make_avalanche_counter():
    """An Avalanche plugin that counts training iterations and samples, evaluations and their batches and
    samples, and times each evaluation."""
    from avalanche.core import SupervisedPlugin

    class Counter(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.evals = self.iters = self.samples = self.eval_batches = self.eval_samples = 0
            self.eval_seconds = 0.0
            self._t0 = None

        def before_eval(self, strategy, **kwargs):
            self._t0 = time.perf_counter()

        def after_eval(self, strategy, **kwargs):
            self.eval_seconds += time.perf_counter() - self._t0
            self.evals += 1

        def after_eval_iteration(self, strategy, **kwargs):
            self.eval_batches += 1
            self.eval_samples += len(strategy.mb_y)

        def after_training_iteration(self, strategy, **kwargs):
            self.iters += 1
            self.samples += len(strategy.mb_y)

    return Counter()
