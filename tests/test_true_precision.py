"""Lightning's "true" precisions (``64-true``, ``bf16-true``) convert the weights themselves; every strategy family
must then feed its network inputs of that dtype (uint8 batches are scaled to the model's dtype, not to float32)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from tests.helpers.resume import run_case
from tests.test_resume_matrix import CASES

FAMILIES = ("ER", "DERpp", "iCaRL", "GeRe", "ER+InTAct", "EWC", "LwF", "WSN", "HyperInterval", "OVOR")
"""One case of each strategy family of the resume matrix (same small streams)."""


@pytest.mark.parametrize("name", FAMILIES)
def test_a_stream_runs_in_double_precision(tmp_path, name):
    case = CASES[name]
    case = type(case)(case.make_model, case.data, {**case.trainer, "precision": "64-true"}, case.callbacks)
    with contextlib.redirect_stdout(io.StringIO()):
        run = run_case(case, tmp_path)
    last = [a for a in run.trainer.accuracy_matrix[-1] if a == a]
    assert last and all(0.0 <= a <= 1.0 for a in last)
    weights = [p for p in run.model.parameters() if p.is_floating_point()]
    assert weights and all(p.dtype == torch.float64 for p in weights)


def test_a_stream_runs_in_bfloat16(tmp_path):
    case = CASES["DERpp"]
    case = type(case)(case.make_model, case.data, {**case.trainer, "precision": "bf16-true"}, case.callbacks)
    with contextlib.redirect_stdout(io.StringIO()):
        run = run_case(case, tmp_path)
    assert run.model.head.weight.dtype == torch.bfloat16 and run.trainer.accuracy_matrix[-1]
