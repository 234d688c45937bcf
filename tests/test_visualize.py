"""The prediction grid: mistakes come first, framed in red; correct answers unframed."""

import torch
from PIL import Image

from visiontune.visualize import prediction_grid_png


def test_prediction_grid_puts_mistakes_first_and_frames_them(tmp_path):
    colors = [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)]
    dataset = [(torch.tensor(c).view(3, 1, 1).expand(3, 32, 32), i % 2) for i, c in enumerate(colors)]
    labels = torch.tensor([0, 1, 0])
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])  # the third image is a mistake
    path = tmp_path / "predictions.png"
    prediction_grid_png(path, dataset, logits, labels, ["ants", "bees"], {"mean": [0, 0, 0], "std": [1, 1, 1]})

    sheet = Image.open(path).convert("RGB")
    tile, caption, pad, top = 224, 38, 8, 30  # the layout of prediction_grid_png
    assert sheet.size == (4 * (tile + pad) + pad, top + tile + caption + pad)
    centres = [sheet.getpixel((pad + k * (tile + pad) + tile // 2, top + caption + tile // 2)) for k in range(3)]
    assert centres == [(255, 255, 0), (0, 0, 255), (0, 255, 0)]  # the mistake first, then the others in order
    frame = [sheet.getpixel((pad + k * (tile + pad) - 2, top + caption + tile // 2)) for k in range(3)]
    assert frame[0][0] > 150 and frame[0][1] < 60  # red
    assert frame[1] == frame[2] == (255, 255, 255)
