"""Suites of runs (methods x seeds): ``clframe bench`` runs them, ``clframe report`` tabulates them,
``clframe compare`` puts runs side by side. See :mod:`clframe.bench.suite` for the suite format."""

from clframe.bench.suite import Suite, SuiteError, load_suite

__all__ = ["Suite", "SuiteError", "load_suite"]
