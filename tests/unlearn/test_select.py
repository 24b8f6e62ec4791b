from qrunlearn.unlearn import EpochRecord, select_epoch


def _epoch(epoch: int, **metrics: float) -> EpochRecord:
    return EpochRecord(epoch=epoch, forget=0.0, retain=0.0, metrics=metrics)


def test_first_epoch_at_or_below_retrain_is_selected():
    epochs = [_epoch(1, knowmem_f=60.0), _epoch(2, knowmem_f=33.1), _epoch(3, knowmem_f=10.0)]
    assert select_epoch(epochs, 33.1) == 2  # <= (equality counts), and the first one
    assert select_epoch(epochs, 5.0) is None
    assert select_epoch([_epoch(1)], 50.0) is None  # no metric logged
