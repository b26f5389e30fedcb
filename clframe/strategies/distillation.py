"""The soft-target terms of Learning without Forgetting, as plain functions of logits.

Kept apart from the strategy so that each variant can be checked against its formula on a hand-sized
example (``tests/test_lwf.py``).
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                       average_classes: bool = False) -> Tensor:
    """``-mean_batch sum_k p_k log q_k`` with ``p = softmax(teacher / T)``, ``q = softmax(student / T)``.

    Li & Hoiem's ``L_old`` (their Eq. 2). When the student has more columns than the teacher, the teacher's
    probability of the extra (new) classes is 0: they enter the student's softmax normaliser only, which is
    how distillation over all seen classes treats a class the teacher never learned.

    ``average_classes`` divides by the student's number of columns as well (a mean over the batch *and* the
    classes, the teacher padded with zeros): what van de Ven's code computed until May 2019, when the tables of
    the first version of the three-scenario paper were produced; it weakens the term by the number of classes.
    """
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    loss = -(p * log_q[:, : p.shape[1]]).sum(dim=1).mean()
    return loss / student_logits.shape[1] if average_classes else loss
