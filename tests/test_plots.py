"""Tests of mesa_lib.plots: each figure has the artists it promises; bad input -> ValueError."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox  # noqa: E402

from mesa_lib.plots import (  # noqa: E402
    bar_per_class,
    patterns_tensor,
    pca_2d,
    plot_training_history,
    show_images,
    show_patterns,
    show_triggers,
    table,
    trigger_embedding,
)
from mesa_lib.triggers import canonical_patterns, pattern_from_id  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- image grids
def test_show_images_one_grid_with_titles():
    imgs = torch.rand(10, 1, 28, 28)
    ax = show_images(imgs, titles=[f"t{i}" for i in range(10)], nrow=4)
    assert len(ax.images) == 1  # one imshow for the whole grid
    assert [t.get_text() for t in ax.texts] == [f"t{i}" for i in range(10)]
    # make_grid: 4 columns x 3 rows of 28 px + 2 px padding; titles add a strip above each row
    h, w = ax.images[0].get_array().shape[:2]
    assert w == 4 * 30 + 2 and h > 3 * 30 + 2
    assert show_images(imgs, nrow=4).images[0].get_array().shape[:2] == (3 * 30 + 2, 4 * 30 + 2)
    # each title sits inside its own column
    xs = [t.get_position()[0] for t in ax.texts[:4]]
    assert xs == sorted(xs) and all(2 + 30 * c < x < 30 * (c + 1) for c, x in enumerate(xs))


def test_show_images_rgb_and_device_and_existing_axes():
    fig, ax = plt.subplots()
    out = show_images(torch.rand(3, 3, 8, 8), ax=ax)
    assert out is ax and len(ax.images) == 1 and not ax.texts


@pytest.mark.parametrize("bad", [torch.rand(28, 28), torch.rand(5, 28, 28), torch.rand(0, 1, 4, 4),
                                 torch.rand(2, 2, 4, 4)])
def test_show_images_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        show_images(bad)


def test_show_images_rejects_wrong_number_of_titles():
    with pytest.raises(ValueError, match="one title per image"):
        show_images(torch.rand(3, 1, 4, 4), titles=["a", "b"])


# ---------------------------------------------------------------- patterns and triggers
def test_patterns_tensor_matches_pattern_from_id():
    ids = [0, 170, 341, 511, 7]
    pats = patterns_tensor(ids)
    assert pats.shape == (5, 1, 3, 3)
    for k, i in enumerate(ids):
        assert torch.equal(pats[k, 0], pattern_from_id(i))


@pytest.mark.parametrize("bad", [[512], [-1], [1.5], [], [[1, 2]]])
def test_patterns_tensor_rejects_bad_ids(bad):
    with pytest.raises(ValueError):
        patterns_tensor(bad)


def test_show_patterns_default_is_the_51():
    fig = show_patterns()
    ax = fig.axes[0]
    titles = [int(t.get_text()) for t in ax.texts]
    assert titles == canonical_patterns() and len(titles) == 51
    assert len(ax.images) == 1


def test_show_triggers_upscales_nearest():
    trig = patterns_tensor([170, 341])
    ax = show_triggers(trig, scale=4, padding=0)
    arr = ax.images[0].get_array()
    assert arr.shape[:2] == (12, 24)
    # nearest upsampling: each trigger pixel becomes a 4x4 block of the same value
    assert (arr[:4, :4, 0] == 0).all() and (arr[:4, 4:8, 0] == 1).all()


def test_show_triggers_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        show_triggers(torch.rand(2, 1, 3, 3), scale=0)


# ---------------------------------------------------------------- embedding
def test_pca_2d_recovers_the_spread_direction():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, generator=g)
    x = torch.zeros(200, 9)
    x[:, 4] = 3 * t  # the only variance is along pixel 4
    x[:, 0] = 0.01 * torch.randn(200, generator=g)
    xy, comps = pca_2d(x)
    assert xy.shape == (200, 2) and comps.shape == (2, 9)
    assert comps[0, 4] == pytest.approx(1.0, abs=1e-4)  # sign fixed: largest entry positive
    assert torch.allclose(xy[:, 0], 3 * t - (3 * t).mean(), atol=1e-3)


def test_pca_2d_rejects_single_trigger():
    with pytest.raises(ValueError):
        pca_2d(torch.rand(1, 1, 3, 3))


def test_trigger_embedding_thumbnails_and_points():
    trig = torch.rand(30, 1, 3, 3)
    ax = trigger_embedding(trig, max_thumbnails=12)
    boxes = [a for a in ax.artists if isinstance(a, AnnotationBbox)]
    assert len(boxes) == 12
    assert sum(len(c.get_offsets()) for c in ax.collections) == 30
    ax2 = trigger_embedding(trig, thumbnails=False)
    assert not [a for a in ax2.artists if isinstance(a, AnnotationBbox)]


def test_trigger_embedding_colour_by_label_and_value():
    trig = torch.rand(12, 3, 3, 3)
    ax = trigger_embedding(trig, thumbnails=False, color=["a"] * 6 + ["b"] * 6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    ax = trigger_embedding(trig, thumbnails=False, color=torch.linspace(0, 1, 12), colorbar_label="ASR")
    assert len(ax.figure.axes) == 2  # the plot and its colour bar
    # thumbnails are framed in their point's colour: two groups -> two frame colours
    ax = trigger_embedding(trig, color=["a"] * 6 + ["b"] * 6, max_thumbnails=12)
    frames = {a.patch.get_edgecolor() for a in ax.artists if isinstance(a, AnnotationBbox)}
    assert len(frames) == 2
    with pytest.raises(ValueError, match="one per trigger"):
        trigger_embedding(trig, color=[0.1, 0.2])


# ---------------------------------------------------------------- training history
def _history(m=3, n=5):
    return {"step": list(range(0, 10 * n, 10)), "f_mean": torch.rand(n, m).tolist(),
            "valid_frac": torch.rand(n, m).tolist(), "mi": torch.rand(n, m).tolist()}


def test_plot_training_history_one_line_per_submodel():
    fig = plot_training_history(_history(), betas=(0.5, 0.8, 0.9))
    assert len(fig.axes) == 3
    assert all(len(ax.get_lines()) >= 3 for ax in fig.axes)
    assert len(fig.axes[0].get_lines()) == 6  # 3 curves + 3 beta lines
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["beta=0.5", "beta=0.8", "beta=0.9"]


def test_plot_training_history_rejects_bad_history():
    with pytest.raises(ValueError, match="lacks"):
        plot_training_history({"step": [0]})
    with pytest.raises(ValueError, match="empty"):
        plot_training_history({"step": [], "f_mean": [], "valid_frac": [], "mi": []})
    with pytest.raises(ValueError, match="betas"):
        plot_training_history(_history(), betas=(0.5,))


# ---------------------------------------------------------------- bars and tables
def test_bar_per_class_highlights_one_bar():
    ax = bar_per_class([0.1, 0.9, 0.2], highlight=1, threshold=0.5)
    bars = ax.patches
    assert len(bars) == 3
    assert bars[1].get_facecolor() != bars[0].get_facecolor() == bars[2].get_facecolor()
    assert [b.get_height() for b in bars] == pytest.approx([0.1, 0.9, 0.2])


@pytest.mark.parametrize("kw", [{"values": []}, {"values": [[0.1]]}, {"values": [0.1], "highlight": 3},
                                {"values": [0.1], "highlight": "0"}, {"values": [0.1], "class_names": ["a", "b"]}])
def test_bar_per_class_rejects_bad_input(kw):
    with pytest.raises(ValueError):
        bar_per_class(**kw)


def test_table_html_and_markdown():
    t = table([["clean", 0.891, 3], ["<b>", 0.5, 4]], ["model", "acc", "n"])
    assert t._repr_markdown_().splitlines() == ["| model | acc | n |", "|---|---|---|", "| clean | 89.1% | 3 |",
                                                "| <b> | 50.0% | 4 |"]
    html = t._repr_html_()
    assert html.count("<tr>") == 3 and "<td>89.1%</td>" in html and "&lt;b&gt;" in html
    with pytest.raises(ValueError):
        table([["a"]], ["x", "y"])


def test_trigger_painter_html_embeds_every_pattern_and_checks_input():
    import re

    import pytest

    from mesa_lib.plots import trigger_painter_html
    from mesa_lib.triggers import canonical_id

    asr = torch.arange(512, dtype=torch.float32) / 511
    page = trigger_painter_html(asr, start=170, n_images=256, target="0 (T-shirt/top)")
    table = re.search(r"var asr = \[([^\]]*)\]", page).group(1).split(",")
    assert len(table) == 512 and float(table[511]) == 1.0 and abs(float(table[170]) - 170 / 511) < 1e-4
    canon = re.search(r"var canon = \[([^\]]*)\]", page).group(1).split(",")
    assert [int(c) for c in canon] == [canonical_id(i) for i in range(512)]
    assert page.count('class="px"') == 9 and 'data-pattern="170"' in page
    with pytest.raises(ValueError, match="512 finite values"):
        trigger_painter_html(asr[:10], start=0, n_images=1, target="0")
    with pytest.raises(ValueError, match="pattern id"):
        trigger_painter_html(asr, start=512, n_images=1, target="0")
