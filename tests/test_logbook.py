"""The training curves: the loss axis leaves the untrained validation off the scale."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from dwise_jax.logbook import Logbook, loss_limits

matplotlib.use("Agg")


def test_loss_limits_leave_the_untrained_validation_off_the_scale():
    train = [{"step": 25, "loss": 900.0}, {"step": 50, "loss": 800.0}]
    val = [{"step": 0, "loss": 2.7e6}, {"step": 50, "loss": 850.0}]
    # Hand-computed: values 900, 800, 850 -> range 100, margin 5.
    assert loss_limits(train, val) == pytest.approx((795.0, 905.0))
    # Nothing trained yet: matplotlib's own range.
    assert loss_limits([], [{"step": 0, "loss": 2.7e6}]) is None
    # A single value gets a margin of 5% of itself; non-finite losses are ignored.
    assert loss_limits([{"step": 1, "loss": 10.0}, {"step": 2, "loss": float("nan")}],
                       []) == pytest.approx((9.5, 10.5))


def test_curves_png_uses_those_limits(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    book = Logbook(tmp_path, tensorboard=False)
    book.log(0, "val", loss=2.7e6, corr=0.0)
    for step, loss in ((25, 900.0), (50, 800.0)):
        book.log(step, "train", loss=loss, lr=1e-3)
    book.log(50, "val", loss=850.0, corr=0.1)
    seen = []
    real_close = plt.close

    def keep_limits(fig):
        seen.append(fig.axes[0].get_ylim())
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep_limits)
    path = book.plot()
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(seen, [(795.0, 905.0)])


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    # A fresh interpreter (this one may have imported torch already), where torch is installed:
    # the events file holds the logged scalar, torch stays unimported, and can still be
    # imported afterwards.
    import subprocess
    import sys

    code = ("import sys; from dwise_jax.logbook import Logbook; "
            f"b = Logbook({str(tmp_path)!r}, plot=False); b.log(3, 'train', loss=2.5); "
            "b.writer.close(); print('torch' in sys.modules); import torch; print(bool(torch))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"], out
    (events,) = (tmp_path / "tensorboard").iterdir()
    assert b"train/loss" in events.read_bytes()
