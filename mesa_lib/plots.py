"""The book's figures: image grids, trigger patterns, trigger embeddings, training curves.

Every function takes tensors as the rest of ``mesa_lib`` produces them (images and triggers
``[N, C, H, W]`` with values in ``[0, 1]``, on any device), draws with matplotlib, and
returns the Axes or Figure it drew on, so a notebook can add titles or save it. Grids are
built by :func:`torchvision.utils.make_grid`, so there is one ``imshow`` per grid, not one
per image.

* :func:`show_images` -- a grid of images, optionally with a title over each.
* :func:`show_patterns` -- black-and-white 3x3 patterns from their ids (default: the 51).
* :func:`show_triggers` -- 3x3 triggers, enlarged with nearest-neighbour upsampling.
* :func:`pca_2d` and :func:`trigger_embedding` -- a 2-D PCA of triggers with thumbnails
  (the paper's alpha and beta figures).
* :func:`plot_training_history` -- MESA's curves per sub-model (from :func:`~mesa_lib.train_staircase`).
* :func:`bar_per_class` -- one bar per class, one of them highlighted (detection scans, ASRs).
* :func:`table` -- a small table (HTML in notebooks and the book, no pandas needed).
* :func:`trigger_painter_html` -- a 3x3 trigger painter that runs in the browser alone, from
  the precomputed ASRs of all 512 patterns (works in the static HTML book, without a kernel).
"""

from __future__ import annotations

import hashlib
import html
import math
import numbers
import operator
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from .triggers import NUM_PATTERNS, canonical_id, canonical_patterns, patterns_tensor

__all__ = [
    "show_images",
    "show_patterns",
    "patterns_tensor",
    "show_triggers",
    "pca_2d",
    "trigger_embedding",
    "plot_training_history",
    "bar_per_class",
    "table",
    "trigger_painter_html",
]


def _as_images(images: Any, name: str = "images") -> torch.Tensor:
    """``[N, C, H, W]`` float tensor on the CPU with C in {1, 3}, or a ValueError saying what to do."""
    x = torch.as_tensor(images).detach()
    if x.dim() == 3:  # one image, or N grey images without a channel axis: be explicit instead
        raise ValueError(
            f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}; "
            f"use {name}.unsqueeze(0) for one image or {name}.unsqueeze(1) for grey images"
        )
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty: nothing to show")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")
    return x.float().cpu().clamp(0, 1)


def _new_ax(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def show_images(
    images: torch.Tensor,
    titles: Sequence[Any] | None = None,
    nrow: int = 8,
    ax: Axes | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
    title_size: float = 8,
    cell_inches: float = 0.9,
) -> Axes:
    """Show images ``[N, C, H, W]`` (values in ``[0, 1]``) as one grid, ``nrow`` per row.

    ``titles`` (one per image) are written in a band above each image. A new figure is
    ``cell_inches`` wide per image. Returns the Axes, which holds one image (the grid) and
    one text per title.
    """
    x = _as_images(images)
    n, _, h, w = x.shape
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images; give one title per image or None")
    ncol = min(nrow, n)
    band = 0
    if titles is not None:  # a strip above every image for its title (about 1.6 text lines)
        lines = max(str(t).count("\n") + 1 for t in titles)
        band = math.ceil(w * lines * 1.6 * title_size / 72 / cell_inches)
        x = F.pad(x, (0, 0, band, 0), value=1.0)  # white strip
    grid = make_grid(x, nrow=ncol, padding=padding, pad_value=pad_value)  # [3, H', W']
    gh, gw = grid.shape[1:]
    ax = _new_ax(ax, (cell_inches * ncol, cell_inches * ncol * gh / gw))
    ax.imshow(grid.permute(1, 2, 0).cpu().numpy(), interpolation="nearest", vmin=0, vmax=1)
    ax.set_axis_off()
    if titles is not None:
        for k, t in enumerate(titles):  # one text artist per title (matplotlib has no batched text)
            r, c = divmod(k, ncol)
            ax.text(padding + c * (w + padding) + w / 2, padding + r * (h + band + padding) + band / 2, str(t),
                    ha="center", va="center", fontsize=title_size)
    return ax


def show_triggers(
    triggers: torch.Tensor,
    titles: Sequence[Any] | None = None,
    nrow: int = 8,
    ax: Axes | None = None,
    scale: int = 8,
    pad_value: float = 0.5,
    **kw: Any,
) -> Axes:
    """Show small triggers ``[N, C, p, p]`` enlarged ``scale`` times (nearest neighbour).

    Grey padding separates the cells, so a black or white trigger stays visible. Other
    keyword arguments go to :func:`show_images`.
    """
    x = _as_images(triggers, "triggers")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    big = F.interpolate(x, scale_factor=scale, mode="nearest")
    return show_images(big, titles=titles, nrow=nrow, ax=ax, pad_value=pad_value, **kw)


def show_patterns(ids: Sequence[int] | torch.Tensor | None = None, nrow: int = 17, cell_inches: float = 0.42,
                  **kw: Any) -> Figure:
    """A figure of black-and-white 3x3 patterns with their ids as titles.

    ``ids`` defaults to the 51 canonical patterns (:func:`~mesa_lib.canonical_patterns`).
    Other keyword arguments go to :func:`show_triggers`.
    """
    ids = canonical_patterns() if ids is None else ids
    pats = patterns_tensor(ids)
    ax = show_triggers(pats, titles=[int(i) for i in torch.as_tensor(ids)], nrow=nrow, cell_inches=cell_inches, **kw)
    return ax.figure


def pca_2d(triggers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project triggers (any shape ``[N, ...]``) on their first two principal components.

    Returns ``(coords [N, 2], components [2, D])``. Exact SVD of the centred ``[N, D]`` matrix
    (D = 9 or 27 for 3x3 triggers, so this is cheap); each component's sign is fixed so that
    its largest entry is positive, which makes the picture reproducible.
    """
    x = torch.as_tensor(triggers).detach().float().cpu()
    if x.dim() < 2 or len(x) < 2:
        raise ValueError(f"need at least 2 triggers [N, ...] for a PCA, got shape {tuple(x.shape)}")
    x = x.reshape(len(x), -1)
    xc = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    comps = vh[:2]
    if len(comps) < 2:  # D == 1: pad with a zero direction
        comps = torch.cat([comps, torch.zeros_like(comps)])
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return xc @ comps.T, comps


def trigger_embedding(
    triggers: torch.Tensor,
    ax: Axes | None = None,
    thumbnails: bool = True,
    color: str | Sequence[Any] | torch.Tensor | None = None,
    max_thumbnails: int = 40,
    zoom: float = 2.0,
    cmap: str = "viridis",
    colorbar_label: str | None = None,
    seed: int = 0,
) -> Axes:
    """A 2-D PCA map of triggers ``[N, C, p, p]``, with small thumbnails of some of them.

    ``color`` is one matplotlib colour, one number per trigger (drawn with ``cmap`` and a
    colour bar, e.g. each trigger's ASR), or one label per trigger (a colour per label and
    a legend, e.g. which generator drew it). At most ``max_thumbnails`` triggers, picked at
    random with ``seed``, get a thumbnail (an ``AnnotationBbox`` on their point), framed in
    the point's colour.
    """
    from matplotlib.colors import to_rgba
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    x = _as_images(triggers, "triggers")
    n = len(x)
    xy, _ = pca_2d(x)
    ax = _new_ax(ax, (6, 5))
    if color is None or isinstance(color, str):
        ax.scatter(xy[:, 0], xy[:, 1], s=10, color=color or "tab:blue", alpha=0.6)
        point_colors = [to_rgba(color or "tab:blue")] * n
    else:
        values = list(color.tolist() if isinstance(color, torch.Tensor) else color)
        if len(values) != n:
            raise ValueError(f"got {len(values)} colour values for {n} triggers; give one per trigger")
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=10, c=values, cmap=cmap, alpha=0.8)
            ax.figure.colorbar(sc, ax=ax, label=colorbar_label)
            point_colors = [tuple(c) for c in sc.cmap(sc.norm(values))]
        else:
            labels = [str(v) for v in values]
            groups = list(dict.fromkeys(labels))
            prop = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            group_color = {lab: prop[k % len(prop)] for k, lab in enumerate(groups)}
            for lab in groups:
                m = torch.tensor([lb == lab for lb in labels])
                ax.scatter(xy[m, 0], xy[m, 1], s=10, color=group_color[lab], alpha=0.6, label=lab)
            point_colors = [to_rgba(group_color[lb]) for lb in labels]
            ax.legend(loc="best", fontsize=8, markerscale=2)
    if thumbnails and max_thumbnails > 0:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n, generator=g)[:max_thumbnails]
        img = x[pick].permute(0, 2, 3, 1)
        img = img.expand(*img.shape[:3], 3) if img.shape[-1] == 1 else img
        for k, i in enumerate(pick.tolist()):  # one artist per thumbnail: matplotlib needs one each
            box = OffsetImage(img[k].cpu().numpy(), zoom=zoom * 3, interpolation="nearest")
            ax.add_artist(AnnotationBbox(box, (float(xy[i, 0]), float(xy[i, 1])), frameon=True, pad=0.15,
                                         bboxprops={"edgecolor": point_colors[i], "linewidth": 1.5}))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return ax


def plot_training_history(history: Mapping[str, Any], betas: Sequence[float] | None = None,
                          labels: Sequence[str] | None = None) -> Figure:
    """MESA's training curves: mean ``f``, fraction of samples above beta, and the MINE
    estimate, one line per sub-model, against the generator step.

    ``history`` is the dict returned by :func:`~mesa_lib.train_staircase` /
    :func:`~mesa_lib.train_mesa`; ``betas`` (one per sub-model) label the lines and draw the
    thresholds on the first panel.
    """
    missing = [k for k in ("step", "f_mean", "valid_frac", "mi") if k not in history]
    if missing:
        raise ValueError(
            f"history lacks {missing}; pass the history dict returned by train_staircase/train_mesa"
        )
    steps = list(history["step"])
    if not steps:
        raise ValueError("history is empty (0 logged steps); train for at least one step")
    curves = {k: torch.as_tensor(history[k], dtype=torch.float32).detach().cpu() for k in ("f_mean", "valid_frac", "mi")}
    for k, v in curves.items():
        if v.dim() != 2 or len(v) != len(steps):
            raise ValueError(f"history[{k!r}] must be [logged steps={len(steps)}, sub-models], got {tuple(v.shape)}")
    m = curves["f_mean"].shape[1]
    if betas is not None and len(betas) != m:
        raise ValueError(f"got {len(betas)} betas for {m} sub-models")
    if labels is None:
        labels = [f"beta={b:g}" for b in betas] if betas is not None else [f"sub-model {i}" for i in range(m)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), constrained_layout=True)
    titles = {"f_mean": "mean f (target probability)", "valid_frac": "fraction of samples with f > beta",
              "mi": "MINE estimate of I(z; x)"}
    for ax, (k, v) in zip(axes, curves.items()):
        lines = ax.plot(steps, v.cpu().numpy())
        ax.set_title(titles[k], fontsize=10)
        ax.set_xlabel("generator step")
        if k == "f_mean" and betas is not None:
            for line, b in zip(lines, betas):
                ax.axhline(b, color=line.get_color(), ls=":", lw=1)
    axes[0].legend(lines, labels, fontsize=8)
    return fig


def bar_per_class(
    values: Sequence[float] | torch.Tensor,
    highlight: int | None = None,
    ax: Axes | None = None,
    ylabel: str = "attack success rate",
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
) -> Axes:
    """One bar per class; ``highlight`` (a class index) is drawn in red, the others grey.

    ``threshold`` draws a dashed horizontal line (e.g. a detection threshold).
    """
    v = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if v.dim() != 1 or len(v) == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence (one per class), got shape {tuple(v.shape)}")
    n = len(v)
    if highlight is not None:
        try:
            h = operator.index(highlight)
        except TypeError:
            h = -1
        if not 0 <= h < n:
            raise ValueError(f"highlight must be a class index in 0..{n - 1} or None, got {highlight!r}")
        highlight = h
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"got {len(class_names)} class names for {n} values")
    ax = _new_ax(ax, (max(4.0, 0.5 * n), 3))
    colors = ["tab:red" if i == highlight else "0.6" for i in range(n)]
    ax.bar(range(n), v.cpu().numpy(), color=colors)
    ax.set_xticks(range(n), list(class_names) if class_names is not None else [str(i) for i in range(n)],
                  rotation=45 if class_names is not None else 0, ha="right" if class_names is not None else "center")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("class")
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1)
    return ax


class Table:
    """A small table that renders as HTML in notebooks and in the built book, and as
    Markdown elsewhere; made by :func:`table`."""

    def __init__(self, rows: list[list[str]], headers: list[str]):
        self.rows, self.headers = rows, headers

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        return f'<table class="table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def _repr_markdown_(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])

    def __repr__(self) -> str:
        return self._repr_markdown_()


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str = ".1%") -> Table:
    """A table for a notebook: the last expression of a cell shows it (HTML, or Markdown).

    Floats are formatted with ``floatfmt`` (default: percentages), other cells with ``str``.
    Needs no pandas.
    """
    headers = [str(h) for h in headers]
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells (one per header)")

    def cell(v: Any) -> str:
        if isinstance(v, torch.Tensor) and v.numel() == 1:  # a scalar tensor, on any device
            v = v.item()
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    return Table([[cell(v) for v in r] for r in rows], headers)


def trigger_painter_html(asr: torch.Tensor | Sequence[float], start: int, n_images: int, target: str) -> str:
    """A self-contained HTML trigger painter: a 3x3 grid of pixels (click to flip black/white)
    and a readout of the pattern's id, its symmetry class and its ASR, looked up in ``asr``
    (``[512]``, pattern-id order, e.g. from :func:`~mesa_lib.evaluate.residual_valid_set`).

    Everything is in the HTML (the 512 values and a few lines of JavaScript), so the painter
    works in the static HTML book, in JupyterLab and in Colab, with no kernel behind it.
    Pixel ``k`` (row by row) is bit ``8 - k`` of the id, as in
    :func:`~mesa_lib.triggers.pattern_id`. ``start`` is the pattern drawn first; ``n_images``
    and ``target`` are only for the readout's wording.
    """
    values = torch.as_tensor(asr, dtype=torch.float64).detach().cpu().flatten()
    if values.numel() != NUM_PATTERNS or not bool(torch.isfinite(values).all()):
        raise ValueError(f"asr must hold {NUM_PATTERNS} finite values (one per pattern id), got {values.numel()}")
    if not 0 <= int(start) < NUM_PATTERNS:
        raise ValueError(f"start must be a pattern id in 0..{NUM_PATTERNS - 1}, got {start}")
    table_js = ",".join(f"{v:.4f}" for v in values.tolist())
    uid = f"mesa-painter-{int(start)}-{hashlib.sha1(table_js.encode()).hexdigest()[:8]}"
    canon_js = ",".join(str(canonical_id(i)) for i in range(NUM_PATTERNS))
    pixels = "".join(f'<button type="button" class="px" data-k="{k}" aria-label="pixel {k + 1}"></button>'
                     for k in range(9))
    return f"""<div class="mesa-painter" id="{uid}" data-pattern="{int(start)}">
<style>
#{uid} {{display:flex;align-items:center;gap:1.2em}}
#{uid} .grid {{display:grid;grid-template-columns:repeat(3,46px);gap:2px}}
#{uid} .px {{width:46px;height:46px;background:#000;border:1px solid #888;padding:0;cursor:pointer}}
#{uid} .px.on {{background:#fff}}
</style>
<div class="grid">{pixels}</div>
<p class="readout">(the painter needs JavaScript)</p>
<script>
(function () {{
  var root = document.getElementById("{uid}");
  var asr = [{table_js}];
  var canon = [{canon_js}];
  var id = {int(start)};
  function draw() {{
    root.querySelectorAll(".px").forEach(function (b) {{
      var on = (id >> (8 - Number(b.dataset.k))) & 1;
      b.classList.toggle("on", on === 1);
      b.setAttribute("aria-pressed", on === 1 ? "true" : "false");
    }});
    root.dataset.pattern = String(id);
    root.querySelector(".readout").innerHTML = "pattern <b>" + id + "</b> (symmetry class " + canon[id] +
      ")<br>ASR <b>" + (100 * asr[id]).toFixed(1) + "%</b> of {int(n_images)} non-target images go to class " +
      {html.escape(target)!r};
  }}
  root.querySelectorAll(".px").forEach(function (b) {{
    b.addEventListener("click", function () {{ id ^= 1 << (8 - Number(b.dataset.k)); draw(); }});
  }});
  draw();
}})();
</script>
</div>"""
