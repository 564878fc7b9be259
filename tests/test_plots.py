"""The PNG histogram of plots.py: a real image, thresholds, empty series, a clear error without matplotlib."""

from __future__ import annotations

import sys

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_histogram_png(tmp_path, monkeypatch):
    from endokern.plots import histogram_png

    path = tmp_path / "h.png"
    got = histogram_png(str(path), {"chosen": [0.5, 1.5, 2.0, -0.2, float("nan")], "rejected": [-1.0, -0.5, 0.1],
                                    "none": []},
                        title="margins", xlabel="margin", thresholds={"cut": 0.3}, bins=10)
    assert got == str(path) and path.read_bytes()[:8] == PNG_SIGNATURE
    from matplotlib import image

    pixels = image.imread(str(path))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len({tuple(p) for p in (pixels[..., :3] * 255).astype(int).reshape(-1, 3)}) > 20
    histogram_png(str(tmp_path / "empty.png"), {}, title="t", xlabel="x")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="bins"):
        histogram_png(str(tmp_path / "b.png"), {"a": [1.0]}, title="t", xlabel="x", bins=0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'endokern\[plot\]'"):
        histogram_png(str(tmp_path / "m.png"), {"a": [1.0]}, title="t", xlabel="x")
