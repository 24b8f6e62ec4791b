"""The reversion figure: the share of the unlearning effect a quantizer undoes, only where there was forgetting."""

from __future__ import annotations

import pytest

from qrunlearn.report import reversion
from qrunlearn.results import Metrics


def _m(knowmem_f: float, answer_nll: float) -> Metrics:
    return Metrics(knowmem_f=knowmem_f, knowmem_f_answer_nll=answer_nll)


def test_share_of_the_effect_undone():
    target, fp = _m(85.0, 0.1), _m(55.0, 2.1)
    assert reversion(target, fp, _m(70.0, 1.1)).knowmem_f == pytest.approx(0.5)  # half way back to the target
    assert reversion(target, fp, _m(70.0, 1.1)).answer_nll == pytest.approx(0.5)
    assert reversion(target, fp, _m(50.0, 2.6)).knowmem_f == pytest.approx(-1 / 6)  # quantization forgot more
    assert reversion(target, fp, _m(55.0, 2.1)).knowmem_f == 0.0


def test_no_share_without_forgetting():
    target = _m(85.0, 0.1)
    # KnowMem went up and the NLL down: unlearning failed, there is nothing for a quantizer to undo
    assert reversion(target, _m(90.0, 0.05), _m(80.0, 0.2)).knowmem_f is None
    assert reversion(target, _m(90.0, 0.05), _m(80.0, 0.2)).answer_nll is None
    assert reversion(target, _m(84.5, 0.12), _m(80.0, 0.2)).knowmem_f is None  # moved < 1 point
