"""The quality-vs-NFE sweep of --mode=eval: parsing config.eval.sweep, and writing its table
(JSON), plot (PNG) and TensorBoard scalars.

Syntax: "method:nfe,nfe,...;method:nfe,..." with methods from samplers.METHODS and NFE the
number of network evaluations (config.sample.num_steps), e.g.
"ddim:10,20,50;dpm_solver++3m:5,10,20;edm_heun:9,19". Every other sampling setting (schedule,
eta, churn, guidance, seed) comes from config.sample, so all settings share the same seeds.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

from jax_diffusion import samplers
from jax_diffusion.errors import ConfigError

EXAMPLE = "ddim:10,20,50;dpm_solver++3m:5,10,20;edm_heun:9,19"


def parse_sweep(text: str) -> list[tuple[str, int]]:
    """[(method, nfe), ...] in the order given; ConfigError naming config.eval.sweep for an
    empty sweep, a malformed part, an unknown method, an NFE the method cannot use or a
    repeated setting."""
    parts = [part.strip() for part in str(text).split(";") if part.strip()]
    if not parts:
        raise ConfigError(f"config.eval.sweep={text!r} is empty; give method:NFE lists such as "
                          f"'{EXAMPLE}'")
    settings: list[tuple[str, int]] = []
    for part in parts:
        method, colon, counts = (piece.strip() for piece in part.partition(":"))
        if not colon or not counts:
            raise ConfigError(f"config.eval.sweep: {part!r} is not method:NFE,NFE,...; e.g. "
                              f"'{EXAMPLE}'")
        if method not in samplers.METHODS:
            raise ConfigError(f"config.eval.sweep: unknown method {method!r}; allowed: "
                              f"{', '.join(samplers.METHODS)}")
        for count in counts.split(","):
            try:
                nfe = int(count.strip())
            except ValueError:
                raise ConfigError(f"config.eval.sweep: {count.strip()!r} in {part!r} is not an "
                                  "integer number of network evaluations") from None
            problem = samplers.METHODS[method].nfe_problem(nfe)
            if problem is not None:
                raise ConfigError(f"config.eval.sweep: {method}:{nfe}: the NFE {problem}")
            if (method, nfe) in settings:
                raise ConfigError(f"config.eval.sweep: {method}:{nfe} is given twice")
            settings.append((method, nfe))
    return settings


def sweep_config(config: ml_collections.ConfigDict, method: str,
                 nfe: int) -> ml_collections.ConfigDict:
    """A copy of `config` sampling with `method` at `nfe` network evaluations (its knobs as
    `samplers.with_method` sets them); checked like any config."""
    return samplers.with_method(config, method, nfe)


# Positive values spanning more than this ratio get a log-scaled quality axis: a distance (FID,
# Frechet) falls by orders of magnitude with NFE, and a linear axis flattens the good settings.
LOG_QUALITY_AXIS_ABOVE = 10.0


def sweep_figure(rows: Sequence[Mapping], metric_name: str) -> Figure:
    """Quality against NFE: one line per method (points in NFE order), log-scaled NFE axis, and
    a log-scaled quality axis for positive values spanning more than LOG_QUALITY_AXIS_ABOVE."""
    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    axes = figure.add_subplot()
    for method in dict.fromkeys(row["method"] for row in rows):   # first-seen order
        points = sorted((row["nfe"], row[metric_name]) for row in rows if row["method"] == method)
        axes.plot([nfe for nfe, _ in points], [value for _, value in points], marker="o",
                  label=method)
    axes.set_xscale("log")
    # Ticks at 1, 2, 5, 10, 20, 50, ... labelled as plain numbers (not 2x10^1).
    axes.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_locator(NullLocator())
    values = np.array([row[metric_name] for row in rows], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() > LOG_QUALITY_AXIS_ABOVE * values.min():
        axes.set_yscale("log")
    axes.set_xlabel("network evaluations (NFE)")
    axes.set_ylabel(metric_name)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def tensorboard_scalars(rows: Sequence[Mapping], metric_name: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) per row: tag "sweep/<metric>/<method>", step = NFE, so TensorBoard
    draws one curve per method against NFE."""
    return [(f"sweep/{metric_name}/{row['method']}", int(row["nfe"]), float(row[metric_name]))
            for row in rows]


def write_sweep(rows: Sequence[Mapping], workdir: str, metric_name: str) -> tuple[str, str]:
    """Write <workdir>/sweep/sweep_<metric>.json ({"metric", "rows"}: every row's keys, NaN as
    null) and the plot sweep_<metric>.png; both replaced atomically. Each row holds "method",
    "nfe" and `metric_name` (more keys, e.g. other metrics, are kept in the JSON)."""
    for row in rows:
        missing = {"method", "nfe", metric_name} - set(row)
        if missing:
            raise ValueError(f"sweep row {dict(row)} lacks {', '.join(sorted(missing))}")
    out_dir = os.path.join(workdir, "sweep")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"sweep_{metric_name}")
    table = {"metric": metric_name,
             "rows": [{key: json_value(value) for key, value in row.items()} for row in rows]}
    replace_atomically(stem + ".json", lambda path: write_json(path, table))
    canvas = FigureCanvasAgg(sweep_figure(rows, metric_name))
    replace_atomically(stem + ".png", lambda path: canvas.print_png(path))
    return stem + ".json", stem + ".png"


def json_value(value):
    value = value.item() if hasattr(value, "item") else value   # numpy scalars
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: str, table: dict) -> None:
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def replace_atomically(path: str, write) -> None:
    """write(tmp) then rename over `path`: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
