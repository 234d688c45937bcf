"""Simple copy-paste augmentation for instance segmentation (Ghiasi et al., 2021): objects cut out of another
training image by their masks are pasted onto this one, at a random scale and place. Objects they cover lose
those pixels; an object left with no pixels is dropped. Boxes are recomputed from the masks.

Random draws use torch's CPU generator, which the training loader seeds per image (engine/distributed.py), so a
run pastes the same objects in the same places whatever the number of workers.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.ops import masks_to_boxes


def paste_objects(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    src_image: torch.Tensor,
    src_masks: torch.Tensor,
    src_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a random non-empty subset of the source's objects (each kept with probability 1/2) onto ``image``.

    image, src_image: uint8 (3, H, W) and (3, h, w); masks, src_masks: uint8 (N, H, W) and (M, h, w); labels (N,), (M,).
    The source is scaled to fit the image, times a factor in [0.5, 1], and placed at a random offset.
    Returns (image, masks, boxes, labels) with the pasted objects last.
    """
    if len(src_masks) == 0:
        return image, masks, masks_to_boxes(masks).float() if len(masks) else torch.zeros((0, 4)), labels
    chosen = torch.rand(len(src_masks)) < 0.5
    chosen[torch.randint(len(src_masks), ())] = True
    src_masks, src_labels = src_masks[chosen], src_labels[chosen]

    (H, W), (h, w) = image.shape[-2:], src_image.shape[-2:]
    scale = min(H / h, W / w) * (0.5 + 0.5 * torch.rand(()).item())
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    src = F.interpolate(src_image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    small = F.interpolate(src_masks[None].float(), size=(nh, nw), mode="nearest")[0] > 0.5
    top, left = torch.randint(H - nh + 1, ()).item(), torch.randint(W - nw + 1, ()).item()

    pasted = torch.zeros((len(small), H, W), dtype=torch.bool)
    pasted[:, top : top + nh, left : left + nw] = small
    keep = pasted.flatten(1).any(1)
    pasted, src_labels = pasted[keep], src_labels[keep]
    alpha = pasted.any(0)
    canvas = torch.zeros_like(image)
    canvas[:, top : top + nh, left : left + nw] = src.round().clamp(0, 255).to(image.dtype)
    image = torch.where(alpha, canvas, image)

    masks = masks * ~alpha  # what the pasted objects cover is no longer seen
    visible = masks.flatten(1).any(1).bool()  # any() of uint8 stays uint8
    masks = torch.cat([masks[visible], pasted.to(masks.dtype)])
    labels = torch.cat([labels[visible], src_labels])
    boxes = masks_to_boxes(masks).float() if len(masks) else torch.zeros((0, 4))
    return image, masks, boxes, labels
