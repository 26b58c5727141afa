"""Figures a reader understands without the docs: analyze's spectra, extract-lora's per-module
error and kept energy, refine's loss and gain per evaluation.

Each `*_figure(result)` builds and returns a matplotlib Figure (tests read it back: labels,
legends, title boxes); each `plot_*(result, path)` draws it and saves it atomically. matplotlib
(the `plot` extra) is imported when a figure is drawn, with the Agg backend.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.errors import OptionError, OutputError, SurgeryError

__all__ = ["check_plot_path", "save_figure", "spectra_figure", "plot_spectra", "extract_figure", "plot_extract",
           "refine_figure", "plot_refine", "layer_type", "PLOT_SUFFIXES"]

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
NO_MATPLOTLIB = "plotting needs matplotlib, which is not installed; pip install 'surgery[plot]'"
DELTA_ENERGIES = (0.90, 0.95, 0.99)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError(NO_MATPLOTLIB) from None
    return plt


def check_plot_path(path: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Validate a plot path before any work: a .png/.svg/.pdf name, matplotlib installed, never
    an input nor inside an input directory, its directory existing, an existing file only with overwrite.

    Args:
        path: the plot file.
        overwrite: replace an existing file.
        inputs: the checkpoints (files or directories) the command reads.

    Returns:
        The path.

    Raises:
        OptionError: another extension (field "plot").
        SurgeryError: matplotlib is not installed.
        OutputError: the path is an input or inside one, its directory is missing, or it exists.

    Example:
        >>> check_plot_path("errors.png", inputs=["fixtures/tiny-bert"])
        PosixPath('errors.png')
    """
    from surgery.io import escape_name
    from surgery.io.guards import check_output_file

    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise OptionError(f"plot {escape_name(path)}: use a .png, .svg or .pdf file name", field="plot")
    if importlib.util.find_spec("matplotlib") is None:
        raise SurgeryError(NO_MATPLOTLIB)
    return check_output_file(path, inputs=inputs, overwrite=overwrite, what="plot")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save FIG to PATH through a temporary sibling (no partial file on failure), then close it.

    Raises:
        OutputError: the file cannot be written (nothing is left behind).
    """
    from surgery.io import escape_name

    plt = _pyplot()
    path = Path(path)
    tmp = path.parent / f".{path.stem}.surgery-tmp-{os.getpid()}{path.suffix}"
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: no temporary file left
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write the plot {escape_name(path)} ({e.strerror or e}); nothing was "
                              "written") from None
        raise
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- names


_INDEX = re.compile(r"(^|\.)(\d+)(?=\.|$)")


def layer_type(module: str) -> str:
    """Module name with layer indices replaced by '*': groups the same layer across blocks.

    Example:
        >>> layer_type("encoder.layer.3.attention.self.query")
        'encoder.layer.*.attention.self.query'
    """
    return _INDEX.sub(r"\1*", module)


def _split_layer(module: str) -> tuple[int | None, str]:
    """(first layer index, the name after it) — ("encoder.layer.3.output.dense") -> (3, "output.dense")."""
    m = _INDEX.search(module)
    if m is None:
        return None, module
    rest = module[m.end():].lstrip(".")
    return int(m.group(2)), rest or module[: m.start()]


def _short(names: Sequence[str]) -> dict[str, str]:
    """Labels without the prefix every name shares (kept readable in a legend)."""
    if len(names) < 2:
        return {n: n for n in names}
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return {n: ".".join(p[k:]) for n, p in zip(names, parts, strict=True)}


# ----------------------------------------------------------------------------- analyze


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _spectrum_panels(ax_s: Any, ax_e: Any, rows: list[tuple[str, Any]], ranks: Sequence[int], which: str) -> None:
    """One layer type: σ_i/σ_1 (log y) and the kept energy per rank, one line per layer, markers at RANKS."""
    import numpy as np

    n_max = 1
    for label, st in rows:
        S = np.asarray(st.singular_values, dtype=float)
        x = np.arange(1, len(S) + 1)
        n_max = max(n_max, len(S))
        (line,) = ax_s.plot(x, np.clip(S / S[0], 1e-12, None), lw=1.0, label=label)
        e = np.concatenate([[0.0], np.cumsum(S**2) / (st.norm**2)])
        ax_e.plot(np.arange(len(e)), e, lw=1.0, color=line.get_color(), label=label)
        at = [r for r in ranks if r <= len(S)]
        ax_e.plot(at, e[at], "o", ms=4, color=line.get_color())
    ax_s.set_yscale("log")
    for ax in (ax_s, ax_e):
        if n_max > 64:
            ax.set_xscale("log")
        else:
            _integer_x(ax)
        ax.set_xlabel("rank r" if ax is ax_e else "index i")
        ax.grid(alpha=0.3, lw=0.5)
    ax_s.set_ylabel(r"$\sigma_i / \sigma_1$")
    ax_e.set_ylabel(f"energy kept ({which})")
    ax_e.set_ylim(0, 1.02)
    for level in DELTA_ENERGIES if which == "delta" else ():
        ax_e.axhline(level, color="grey", lw=0.5, ls=":")
    ncol = 1 if len(rows) <= 6 else 2
    handles, labels = ax_s.get_legend_handles_labels()
    if len(rows) > 12:  # a legend of first and last only: the colours go in order
        handles, labels = [handles[0], handles[-1]], [labels[0] + " (first)", labels[-1] + " (last)"]
    ax_s.legend(handles, labels, fontsize=6, ncol=ncol, title="layer", title_fontsize=6, loc="lower left")
    ax_e.plot([], [], "o", color="black", ms=4, label="requested ranks")
    ax_e.legend(handles=[ax_e.lines[-1]], fontsize=6, loc="lower right")


def _spectra_groups(result: Any) -> tuple[dict[str, list[tuple[str, Any]]], list[str], str]:
    """Layer type -> [(layer label, stats)], the modules left out (zero spectrum), and which spectrum."""
    which = "delta" if result.base is not None else "weight"
    groups: dict[str, list[tuple[str, Any]]] = {}
    empty: list[str] = []
    for m in result.modules:
        st = m.delta if which == "delta" else m.weight
        if st is None or not st.singular_values or st.singular_values[0] == 0.0:
            empty.append(m.module)
            continue
        idx, _ = _split_layer(m.module)
        groups.setdefault(layer_type(m.module), []).append((f"{idx}" if idx is not None else m.module, st))
    return groups, empty, which


def spectra_figure(result: Any) -> Any:
    """analyze's figure: per layer type, σ_i/σ_1 and the energy kept at each rank (one line per
    layer, markers at the requested ranks); modules with a zero spectrum are listed, not drawn.

    Args:
        result: an AnalyzeResult.

    Returns:
        A matplotlib Figure (constrained layout; the checkpoints in the suptitle).
    """
    from surgery.io import escape_name

    plt = _pyplot()
    groups, empty, which = _spectra_groups(result)
    nrows = max(1, len(groups))
    fig, axes = plt.subplots(nrows, 2, figsize=(11, 1.0 + 2.7 * nrows), squeeze=False, layout="constrained")
    for row, (gname, rows) in enumerate(groups.items()):
        ax_s, ax_e = axes[row]
        _spectrum_panels(ax_s, ax_e, rows, result.ranks, which)
        ax_s.set_title(f"{gname}: singular values", fontsize=8)
        ax_e.set_title(f"{gname}: energy kept at rank r", fontsize=8)
    if not groups:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][0].text(0.5, 0.5, f"every {which} is zero: nothing to draw", ha="center",
                        transform=axes[0][0].transAxes)
    title = escape_name(result.model) + (f" - {escape_name(result.base)}" if result.base else "")
    sub = f"{which} spectra per layer type"
    if empty:
        sub += f"; {len(empty)} module(s) with a zero {which} not drawn" + (f" ({empty[0]}, ...)" if empty else "")
    fig.suptitle(f"{title}\n{sub}", fontsize=9)
    return fig


def plot_spectra(result: Any, path: str | Path, *, overwrite: bool = False) -> Path:
    """Draw spectra_figure(result) into PATH (.png/.svg/.pdf), checked against the result's inputs."""
    path = check_plot_path(path, overwrite, [p for p in (result.model, result.base) if p is not None])
    return save_figure(spectra_figure(result), path)


# ----------------------------------------------------------------------------- extract-lora


def _grid(modules: Sequence[Any]) -> tuple[list[str], list[str], dict[tuple[str, str], Any]]:
    """Rows (layers, then 'other'), columns (module within a layer) and the module at each cell."""
    cells: dict[tuple[str, str], Any] = {}
    order: dict[str, tuple[bool, int]] = {}
    for m in modules:
        idx, col = _split_layer(m.module)
        row = f"layer {idx}" if idx is not None else "outside layers"
        order[row] = (idx is None, idx or 0)
        cells[(row, col)] = m
    rows = sorted(order, key=order.__getitem__)
    cols = list(dict.fromkeys(c for _, c in cells))
    return rows, cols, cells


def _heatmap(fig: Any, ax: Any, values: Any, rows: list[str], cols: list[str], label: str, fmt: str,
             log: bool, cmap: str) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    norm = LogNorm(max(lo, 1e-12), max(hi, lo * 10, 1e-11)) if log and lo > 0 and hi / lo > 10 else Normalize(lo, hi)
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_facecolor("#dddddd")  # a module absent from a layer: grey
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=label)
    if values.size <= 150:
        for (i, j), v in np.ndenumerate(values):
            if math.isfinite(v):
                r, g, b, _ = im.cmap(norm(v))
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6,
                        color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")


def extract_figure(result: Any) -> Any:
    """extract-lora's figure: layer x module heatmaps of the relative error ‖Δ − BA‖/‖Δ‖ and of
    the energy of Δ kept (%), with colorbars; cells a layer does not have are grey.

    Args:
        result: an ExtractResult.

    Returns:
        A matplotlib Figure.
    """
    import numpy as np

    from surgery.io import escape_name

    plt = _pyplot()
    rows, cols, cells = _grid(result.modules)
    err = np.full((len(rows), len(cols)), np.nan)
    kept = np.full_like(err, np.nan)
    for (r, c), m in cells.items():
        err[rows.index(r), cols.index(c)] = m.rel_error
        kept[rows.index(r), cols.index(c)] = 100 * m.energy_kept
    width = min(24, 4 + 0.7 * len(cols))
    height = 2 * (1.0 + 0.3 * len(rows)) + 0.9 + 0.08 * max(len(c) for c in cols)
    fig, (ax_e, ax_k) = plt.subplots(2, 1, figsize=(width, height), layout="constrained", sharex=True)
    _heatmap(fig, ax_e, err, rows, cols, "relative error", ".2g", True, "magma_r")
    _heatmap(fig, ax_k, kept, rows, cols, "energy kept (%)", ".0f", False, "viridis")
    ax_e.set_xlabel("")
    ax_e.tick_params(labelbottom=False)
    ax_e.set_title("relative error |delta - BA| / |delta| per module (lower is better)", fontsize=9)
    ax_k.set_title("share of each delta's energy the LoRA keeps (%, higher is better)", fontsize=9)
    fig.suptitle(f"extract-lora {escape_name(result.out)}\n{len(result.modules)} LoRA modules, overall relative "
                 f"error {result.overall_rel_error:.3f}; grey: no such module in that layer", fontsize=10)
    return fig


def plot_extract(result: Any, path: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False) -> Path:
    """Draw extract_figure(result) into PATH (.png/.svg/.pdf); never into INPUTS."""
    path = check_plot_path(path, overwrite, list(inputs))
    return save_figure(extract_figure(result), path)


# ----------------------------------------------------------------------------- refine


def refine_figure(result: Any) -> Any:
    """refine's figure: train and held-out loss per step (the bare base's loss as a reference) and
    the share of the base→teacher gap closed at each evaluation; the saved (best) step marked, and,
    when early stopping (patience) ended the run before its steps, the step where it stopped.

    Args:
        result: a RefineResult.

    Returns:
        A matplotlib Figure.
    """
    from surgery.io import escape_name

    plt = _pyplot()
    fig, (ax_l, ax_g) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    steps = [p.step for p in result.curve]
    held = [p.loss for p in result.curve]
    if result.train_loss:
        ax_l.plot([s for s, _ in result.train_loss], [v for _, v in result.train_loss], ".-", lw=1,
                  label="train loss (mean since last evaluation)")
    ax_l.plot(steps, held, "o-", lw=1.2, label="held-out loss")
    ax_l.axhline(result.no_adapter.loss, color="grey", ls="--", lw=0.8, label="base without adapter")
    ax_l.plot([result.best_step], [result.after.loss], "*", ms=12, color="crimson",
              label=f"best (saved): step {result.best_step}")
    values = [v for v in held + [result.no_adapter.loss] + [v for _, v in result.train_loss] if v > 0]
    if values and max(values) / min(values) > 20:
        ax_l.set_yscale("log")
    ax_l.set_xlabel("optimizer step")
    ax_l.set_ylabel(f"{result.objective} loss")
    ax_l.set_title("loss against the teacher", fontsize=9)
    gap = result.no_adapter.loss
    gain = [100 * (1 - v / gap) if gap > 0 else 100.0 for v in held]
    ax_g.plot(steps, gain, "o-", lw=1.2, label="held-out gap closed")
    ax_g.plot([result.best_step], [100 * result.gap_closed], "*", ms=12, color="crimson",
              label=f"best (saved): {100 * result.gap_closed:.1f}%")
    ax_g.axhline(100, color="grey", ls=":", lw=0.8, label="teacher (100%)")
    _mark_early_stop(result, (ax_l, ax_g))
    ax_g.set_xlabel("optimizer step")
    ax_g.set_ylabel("gap to the teacher closed (%)")
    ax_g.set_title("gain per evaluation", fontsize=9)
    for ax in (ax_l, ax_g):
        _integer_x(ax)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(f"refine {escape_name(result.out)}: {result.objective}, {result.steps} steps", fontsize=10)
    return fig


def _mark_early_stop(result: Any, axes: Sequence[Any]) -> None:
    """A vertical line at the step where early stopping ended the run (none when every step ran)."""
    stopped = getattr(result, "steps_run", 0) or 0
    if not 0 < stopped < result.steps:
        return
    patience = (getattr(result, "options", None) or {}).get("patience")
    why = f", patience {patience}" if patience is not None else ""
    for ax in axes:
        ax.axvline(stopped, color="darkorange", ls="-.", lw=1,
                   label=f"early stop: step {stopped} of {result.steps}{why}")


def plot_refine(result: Any, path: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False) -> Path:
    """Draw refine_figure(result) into PATH (.png/.svg/.pdf); never into INPUTS."""
    path = check_plot_path(path, overwrite, list(inputs))
    return save_figure(refine_figure(result), path)
