from qrunlearn.unlearn import select_epoch


def test_first_epoch_at_or_below_retrain_is_selected():
    rows = [{"epoch": 1, "knowmem_forget": 60.0}, {"epoch": 2, "knowmem_forget": 33.1},
            {"epoch": 3, "knowmem_forget": 10.0}]
    assert select_epoch(rows, 33.1) == 2  # <= (equality counts), and the first one
    assert select_epoch(rows, 5.0) is None
    assert select_epoch([{"epoch": 1}], 50.0) is None  # no metric logged
