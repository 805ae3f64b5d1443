import pytest

from cellsynth.progress import Cancelled, Progress, report, tqdm_callback


def test_report_and_fraction():
    events = []
    report(events.append, "tiles", 3, 4, "tile 3")
    assert events == [Progress("tiles", 3, 4, "tile 3")]
    assert events[0].fraction == 0.75
    assert Progress("x", 5, None).fraction is None
    assert Progress("x", 9, 4).fraction == 1.0


def test_cancel_propagates_from_the_callback():
    def cb(p):
        if p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        for i in range(5):
            report(cb, "s", i, 5)


def test_tqdm_callback_starts_a_bar_per_stage(capsys):
    cb, close = tqdm_callback()
    cb(Progress("download", 1, 2))
    cb(Progress("download", 2, 2))
    cb(Progress("tiles", 1, 3))
    close()
    err = capsys.readouterr().err
    assert "download" in err and "tiles" in err and "2/2" in err
