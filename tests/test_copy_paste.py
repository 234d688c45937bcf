"""Copy-paste augmentation: pasted objects carry their masks, covered pixels leave the objects under them, an object
covered whole is dropped, boxes follow the masks; in the dataset it is seeded per image like the flip."""

from __future__ import annotations

import torch
from detection_helpers import make_pennfudan
from torchvision.ops import masks_to_boxes

from visiontune.data.copy_paste import paste_objects
from visiontune.data.instance import DetectionDataset, load_pennfudan
from visiontune.engine.distributed import SeededPerSample


def test_pasted_objects_cover_what_is_under_them_and_boxes_follow_the_masks():
    image = torch.full((3, 40, 60), 10, dtype=torch.uint8)
    masks = torch.zeros((2, 40, 60), dtype=torch.uint8)
    masks[0, 19:21, 29:31] = 1  # a small object in the middle: covered by some pastes
    masks[1, :, :3] = 1  # a strip along the left edge
    src_image = torch.full((3, 30, 30), 200, dtype=torch.uint8)
    src_masks = torch.ones((1, 30, 30), dtype=torch.uint8)  # one object filling its image
    dropped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out, m, boxes, labels = paste_objects(image, masks, torch.tensor([1, 1]), src_image, src_masks, torch.tensor([2]))
        pasted = m[-1].bool()
        assert labels[-1] == 2 and len(m) == len(boxes) == len(labels) and all(x.any() for x in m)
        assert torch.equal(out[:, pasted], torch.full((3, int(pasted.sum())), 200, dtype=torch.uint8))
        assert torch.equal(out[:, ~pasted], image[:, ~pasted])
        assert not (m[:-1].bool() & pasted).any()  # the objects below lost the covered pixels
        assert torch.equal(boxes, masks_to_boxes(m).float())
        assert 15 * 15 <= pasted.sum() <= 40 * 40  # scaled to fit, times 0.5-1
        dropped += len(m) == 2
    assert 0 < dropped < 30  # the middle object was covered whole in some draws, not in all


def test_dataset_pastes_with_its_probability_and_the_same_way_for_the_same_seed(tmp_path):
    records = load_pennfudan(make_pennfudan(tmp_path / "pf", n=4)).records
    plain = DetectionDataset(records, train=True)
    pasting = SeededPerSample(DetectionDataset(records, train=True, copy_paste=1.0), seed=0, epoch=0)
    for i in range(4):
        image, target = pasting[i]
        again_image, again = pasting[i]
        assert torch.equal(image, again_image) and torch.equal(target["masks"], again["masks"])
        assert len(target["labels"]) >= 1 and target["masks"].shape[-2:] == image.shape[-2:]
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
    more = sum(len(pasting[i][1]["labels"]) - len(records[i].labels) for i in range(4))
    assert more > 0 and len(plain[0][1]["labels"]) == len(records[0].labels)
    assert DetectionDataset(records, train=False, copy_paste=1.0).copy_paste == 0.0  # never at evaluation
