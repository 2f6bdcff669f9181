"""The EMA-length sweep of --mode=eval (config.eval.ema_sweep): its table (JSON) and plot (PNG)
of each metric value against the power EMA's width sigma_rel, each width rebuilt after training
from the snapshots of a config.train.ema="power" run (power_ema.reconstruct)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jax_diffusion.evaluation.sweep import json_value, replace_atomically, write_json

# The best width of each quality value (the others, e.g. standard deviations, get no mark).
BEST = {"fid": min, "kid": min, "frechet": min, "accuracy": max, "is": max}


def ema_sweep_figure(rows: Sequence[Mapping], metric_name: str, step: int) -> Figure:
    """`metric_name` against sigma_rel (points in sigma_rel order), the best point marked for
    a quality value: the lowest distance, the highest accuracy or Inception score."""
    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    axes = figure.add_subplot()
    points = sorted((row["sigma_rel"], row[metric_name]) for row in rows)
    axes.plot([s for s, _ in points], [v for _, v in points], marker="o")
    pick = BEST.get(metric_name)
    if pick is not None:
        best = pick(points, key=lambda point: point[1])
        axes.plot([best[0]], [best[1]], marker="*", markersize=14, linestyle="none",
                  label=f"best: sigma_rel {best[0]:g}")
        axes.legend()
    axes.set_xlabel("EMA length sigma_rel (relative to the training time)")
    axes.set_ylabel(metric_name)
    axes.set_title(f"post-hoc EMA at step {step}")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def write_ema_sweep(rows: Sequence[Mapping], workdir: str, metric_name: str,
                    step: int) -> tuple[str, str]:
    """Write <workdir>/ema_sweep/ema_sweep_<metric>.json ({"metric", "step", "rows"}: every
    row's keys, NaN as null) and the plot ema_sweep_<metric>.png, both replaced atomically.
    Each row holds "sigma_rel" and `metric_name`."""
    for row in rows:
        missing = {"sigma_rel", metric_name} - set(row)
        if missing:
            raise ValueError(f"EMA sweep row {dict(row)} lacks {', '.join(sorted(missing))}")
    out_dir = os.path.join(workdir, "ema_sweep")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"ema_sweep_{metric_name}")
    table = {"metric": metric_name, "step": step,
             "rows": [{key: json_value(value) for key, value in row.items()} for row in rows]}
    replace_atomically(stem + ".json", lambda path: write_json(path, table))
    canvas = FigureCanvasAgg(ema_sweep_figure(rows, metric_name, step))
    replace_atomically(stem + ".png", lambda path: canvas.print_png(path))
    return stem + ".json", stem + ".png"
