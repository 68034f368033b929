"""Argument checks shared by the knowledge-distillation baselines (brcd.kd_losses and brcd.kd_memory): each raises
an exception that names the argument."""
from __future__ import annotations

import math
import numbers

from torch import Tensor

from .ops import _require_tensor


def check_pair(student: Tensor, teacher: Tensor, *, same_bits: bool, min_batch: int,
               names: tuple = ("student", "teacher")) -> Tensor:
    """Checks the two code batches (named `names` in the messages); returns the teacher in the student's dtype."""
    student_name, teacher_name = names
    for name, t in ((student_name, student), (teacher_name, teacher)):
        _require_tensor(t, name)
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [batch, bits], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{teacher_name} has {teacher.shape[0]} rows but {student_name} has {student.shape[0]}: one "
                         "code per image of the batch in each")
    if same_bits and teacher.shape[1] != student.shape[1]:
        raise ValueError(f"{teacher_name} has {teacher.shape[1]} bits but {student_name} has {student.shape[1]}")
    if teacher.device != student.device:
        raise ValueError(f"{teacher_name} is on {teacher.device} but {student_name} is on {student.device}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{student_name} must have at least {min_batch} rows (the loss compares samples of a batch), "
                         f"got {student.shape[0]}")
    return teacher.to(student.dtype)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def momentum_value(value, name: str = "momentum") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return float(value)
