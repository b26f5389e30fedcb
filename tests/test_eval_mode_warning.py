"""Lightning warns about modules in eval mode when training starts; modules a strategy keeps in eval mode on
purpose (a frozen teacher) must not trigger it at every task, while a module left in eval mode by accident must."""

from __future__ import annotations

import warnings

from clframe import ContinualDataModule, ContinualTrainer, LwF
from tests.conftest import QUIET_TRAINER

MESSAGE = "in eval mode at the start of training"


def _fit(model, tmp_path) -> list[str]:
    dm = ContinualDataModule(n_tasks=3, class_order=list(range(6)), batch_size=16)
    trainer = ContinualTrainer(steps_per_task=2, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    return [str(w.message) for w in caught if MESSAGE in str(w.message)]


def test_a_frozen_teacher_does_not_warn(tmp_path):
    assert _fit(LwF(), tmp_path) == []


class _AccidentallyFrozen(LwF):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone_training_at_start: list[bool] = []

    def on_train_start(self) -> None:  # right after the check: it must have left every mode as it was
        self.backbone_training_at_start.append(self.backbone.training)
        super().on_train_start()

    def on_fit_start(self) -> None:
        self.backbone.eval()  # left in eval mode by the user's code: Lightning's warning is wanted


def test_a_module_left_in_eval_mode_still_warns_and_modes_are_kept(tmp_path):
    model = _AccidentallyFrozen()
    messages = _fit(model, tmp_path)
    assert messages and all("backbone" in m for m in messages)
    # the check changed no module's mode: every fit that warned still had the backbone in eval mode afterwards
    assert model.backbone_training_at_start == [False] * len(messages) == [False] * 3
