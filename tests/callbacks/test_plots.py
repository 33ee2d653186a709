"""SamplePlots' grids and curves: the layout a config asks for (rows of per_row images; diversity on its own axis)."""

import pytest
import torch
from PIL import Image

from callbacks import SamplePlots


def grid_size(tmp_path, per_row, n=8):
    plots = SamplePlots(num_samples=n, per_row=per_row)
    samples = (torch.rand(n, 3, 8, 8), [f"prompt {i}" for i in range(n)])
    plots.first_samples = plots.last_samples = samples
    path = tmp_path / f"grid_{per_row}.png"
    plots.plot_grid(str(path))
    return Image.open(path).size


def test_the_grid_has_rows_of_per_row_images_before_above_after(tmp_path):
    (w4, h4), (w2, h2) = grid_size(tmp_path, 4), grid_size(tmp_path, 2)
    assert w4 > w2 and h2 == 2 * h4  # 8 samples: 2 rows of 4 (before, after), or 4 rows of 2 each
    with pytest.raises(ValueError, match="per_row"):
        SamplePlots(per_row=0)


def test_diversity_metrics_get_a_panel_of_their_own(tmp_path):
    plots = SamplePlots()
    plots.val_history = [{"step": 0, "val/acc": 0.3}, {"step": 5, "val/acc": 0.4}]
    plots.plot_curves(str(tmp_path / "two.png"))
    plots.val_history = [{**r, "val/diversity_pixel": 0.2} for r in plots.val_history]
    plots.plot_curves(str(tmp_path / "three.png"))
    two, three = Image.open(tmp_path / "two.png").size, Image.open(tmp_path / "three.png").size
    assert three[0] == pytest.approx(two[0] * 3 / 2, rel=0.01) and three[1] == two[1]  # training, validation, diversity
