import base64

import numpy as np
import pytest

from middo_pipeline.core import plots

PNG = b"\x89PNG\r\n\x1a\n"
LIMIT = 100_000  # data URIs must stay small enough for Dagster metadata


def _ok(png: bytes) -> None:
    assert isinstance(png, bytes) and png.startswith(PNG)
    assert len(png) < LIMIT, len(png)


def test_loss_curve():
    _ok(plots.loss_curve_png([(i, 2.0 / (1 + i)) for i in range(1, 50)]))
    _ok(plots.loss_curve_png([]))
    _ok(plots.loss_curve_png([(1, float("nan")), (2, 1.0)]))


def test_loss_scatter():
    rng = np.random.default_rng(0)
    before = rng.gamma(2.0, 1.0, size=3000)
    after = before * 0.5 + rng.normal(0, 0.1, size=3000)
    after[5] = np.nan
    hard = (before > 4) & (after > 2)
    _ok(plots.loss_scatter_png(before, after, hard, 4.0, 2.0))
    _ok(plots.loss_scatter_png(before, after, hard, float("nan"), float("nan")))
    _ok(plots.loss_scatter_png([], [], np.zeros(0, bool), 1.0, 1.0))
    # many points: subsampled, still small
    n = 60_000
    _ok(plots.loss_scatter_png(rng.random(n), rng.random(n), rng.random(n) > 0.99, 0.9, 0.9))


def test_histogram():
    rng = np.random.default_rng(0)
    values = {"clarity": rng.normal(6, 1, 500), "quality_score": np.append(rng.normal(6, 1, 500), np.nan)}
    _ok(plots.histogram_png(values, {"quality_score": 4.2}, "quality"))
    _ok(plots.histogram_png(values, None, "no thresholds"))
    _ok(plots.histogram_png({"x": np.array([np.nan])}, {"x": float("nan")}, "all missing"))
    _ok(plots.histogram_png({}, {"y": 1.0}, "empty"))


@pytest.mark.parametrize("n_clusters", [3, 30])
def test_cluster_map(n_clusters):
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(2000, 2))
    labels = rng.integers(0, n_clusters, size=2000)
    sparse = rng.random(2000) > 0.95
    _ok(plots.cluster_map_png(xy, labels, sparse, "round 1"))
    _ok(plots.cluster_map_png(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0, bool), "empty"))
    _ok(plots.cluster_map_png(xy[:5], labels[:5], np.zeros(5, bool), "no sparse"))


def test_metric_by_round():
    _ok(plots.metric_by_round_png([1, 2, 3], {"mc_accuracy": [0.3, 0.35, 0.4], "base_mc_accuracy": [0.3] * 3}))
    _ok(plots.metric_by_round_png([1], {"loss": [1.2]}))
    _ok(plots.metric_by_round_png([], {}))
    _ok(plots.metric_by_round_png([1, 2], {"loss": [float("nan"), 1.0]}))


def test_png_to_markdown():
    png = plots.loss_curve_png([(1, 1.0), (2, 0.5)])
    md = plots.png_to_markdown(png, "training [loss]")
    assert md.startswith("![training (loss)](data:image/png;base64,")
    assert md.endswith(")")
    payload = md[md.index("base64,") + 7 : -1]
    assert base64.b64decode(payload) == png


def test_plots_module_has_no_pyplot_state():
    import sys

    plots.loss_curve_png([(1, 1.0)])
    # Figures are built directly on the Agg canvas: nothing registered with pyplot
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
