"""The quality-vs-NFE sweep: parsing config.eval.sweep, its JSON table, plot and scalars."""
import json

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
import pytest
from matplotlib.image import imread

from jax_diffusion.errors import ConfigError
from jax_diffusion.evaluation.sweep import (
    parse_sweep,
    sweep_figure,
    tensorboard_scalars,
    write_sweep,
)


def test_parse_sweep_keeps_the_order_given():
    assert parse_sweep(" ddim:10, 20,50; dpm_solver++3m:5,10 ;edm_heun:9;") == [
        ("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpm_solver++3m", 5),
        ("dpm_solver++3m", 10), ("edm_heun", 9)]


@pytest.mark.parametrize("text, pattern", [
    ("", r"config\.eval\.sweep='' is empty"),
    (" ; ", r"config\.eval\.sweep=' ; ' is empty"),
    ("heun:10", r"config\.eval\.sweep: unknown method 'heun'; allowed: ddpm, ddim, euler"),
    ("edm_heun:9,10", r"config\.eval\.sweep: edm_heun:10: the NFE must be odd for edm_heun"),
    ("ddim:0", r"config\.eval\.sweep: ddim:0: the NFE must be a positive integer"),
    ("ddim:ten", r"config\.eval\.sweep: 'ten' in 'ddim:ten' is not an integer"),
    ("ddim 10", r"config\.eval\.sweep: 'ddim 10' is not method:NFE"),
    ("ddim:", r"config\.eval\.sweep: 'ddim:' is not method:NFE"),
    ("ddim:10;ddim:10", r"config\.eval\.sweep: ddim:10 is given twice"),
])
def test_bad_sweep_is_one_config_error_naming_the_key(text, pattern):
    with pytest.raises(ConfigError, match=pattern) as raised:
        parse_sweep(text)
    assert "\n" not in str(raised.value)


ROWS = [{"method": "ddim", "nfe": 50, "digits_accuracy": 0.97, "fd": 1.5},
        {"method": "ddim", "nfe": 10, "digits_accuracy": np.float64(0.91), "fd": 3.0},
        {"method": "edm_heun", "nfe": 9, "digits_accuracy": 0.93, "fd": float("nan")},
        {"method": "edm_heun", "nfe": 19, "digits_accuracy": 0.96, "fd": 2.0}]


def test_write_sweep_table_and_plot(tmp_path):
    json_path, png_path = write_sweep(ROWS, str(tmp_path), "digits_accuracy")
    assert json_path == str(tmp_path / "sweep" / "sweep_digits_accuracy.json")
    with open(json_path) as f:
        table = json.load(f)
    assert table["metric"] == "digits_accuracy"
    assert [row["nfe"] for row in table["rows"]] == [50, 10, 9, 19]
    assert table["rows"][1]["digits_accuracy"] == 0.91 and table["rows"][2]["fd"] is None
    image = imread(png_path)
    assert image.shape == (400, 600, 4) and image[..., :3].std() > 0.05   # a drawn figure
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [
        "sweep_digits_accuracy.json", "sweep_digits_accuracy.png"]   # no temporary left


def test_plot_has_one_line_per_sampler_against_log_nfe():
    figure = sweep_figure(ROWS, "digits_accuracy")
    FigureCanvasAgg(figure)
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    figure.canvas.draw()
    shown = [label.get_text() for label in axes.get_xticklabels() if label.get_visible()]
    assert {"10", "20", "50"} <= set(shown), shown
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == ["ddim", "edm_heun"]
    np.testing.assert_array_equal(lines["ddim"].get_xdata(), [10, 50])
    np.testing.assert_array_equal(lines["ddim"].get_ydata(), [0.91, 0.97])


def test_quality_axis_is_log_only_for_positive_values_spanning_orders_of_magnitude():
    frechet = [dict(row, fd=value) for row, value in zip(ROWS, (0.5, 0.8, 52.0, 1.0), strict=True)]
    assert sweep_figure(frechet, "fd").axes[0].get_yscale() == "log"
    assert sweep_figure(ROWS, "digits_accuracy").axes[0].get_yscale() == "linear"
    negative = [dict(row, fd=value) for row, value in zip(ROWS, (-1.0, 0.8, 52.0, 1.0),
                                                          strict=True)]
    assert sweep_figure(negative, "fd").axes[0].get_yscale() == "linear"


def test_tensorboard_scalars_one_curve_per_sampler():
    assert tensorboard_scalars(ROWS[:2], "fd") == [("sweep/fd/ddim", 50, 1.5),
                                                   ("sweep/fd/ddim", 10, 3.0)]


def test_row_without_the_metric_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="lacks fid"):
        write_sweep(ROWS, str(tmp_path), "fid")
