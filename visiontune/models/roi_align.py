"""RoIAlign on the CPU as a sparse matrix product: the same numbers as ``torchvision.ops.roi_align``, several times faster.

torchvision's CPU kernel recomputes the bilinear weights for every channel and runs its backward pass on one core;
on Penn-Fudan its backward alone was a third of a Mask R-CNN training step. Here every output cell is a fixed
weighted sum of feature-map positions, so the op is one sparse matrix S (rows: RoI bins, columns: positions, values:
bilinear weights / samples per bin): forward ``S @ X``, backward ``S.T @ dY``, with X the feature map as
(positions, channels), which for a channels_last map is a free view.

Used only where it gives the same result: CPU tensors, a fixed ``sampling_ratio`` (Mask R-CNN's 2), and not while
tracing, scripting or compiling (ONNX export keeps torchvision's op).
"""

from __future__ import annotations

import warnings

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, ...]:
    """Along one axis, for each RoI and each of its ``bins * grid`` sample points: the two neighbouring positions
    and their bilinear weights (zero for points outside the map), following torchvision's rules."""
    i = torch.arange(bins * grid, dtype=start.dtype, device=start.device)
    offsets = torch.div(i, grid, rounding_mode="floor") + (i % grid + 0.5) / grid
    p = start[:, None] + offsets[None, :] * (length / bins)[:, None]
    inside = ((p >= -1.0) & (p <= size)).to(p.dtype)
    p = p.clamp(min=0)
    low = p.floor().long()
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(p), p - low)
    return low, high, (1 - frac) * inside, frac * inside


def _sampling_matrix(
    rois: Tensor, shape: tuple[int, int, int], output_size: tuple[int, int], spatial_scale: float, grid: int, aligned: bool
) -> tuple[Tensor, Tensor, int]:
    """Column indices and values of S, ``grid * grid * 4`` entries per row, rows in output order (roi, y, x)."""
    batch, height, width = shape
    k = rois.shape[0]
    ph, pw = output_size
    shift = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, j] * spatial_scale - shift for j in range(1, 5))
    w, h = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy behaviour: every RoI at least one cell wide
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    y_low, y_high, wy_low, wy_high = _axis_samples(y1, h, ph, grid, height)
    x_low, x_high, wx_low, wx_high = _axis_samples(x1, w, pw, grid, width)
    ys = torch.stack([y_low, y_low, y_high, y_high], -1).view(k, ph, grid, 1, 1, 4)
    xs = torch.stack([x_low, x_high, x_low, x_high], -1).view(k, 1, 1, pw, grid, 4)
    wy = torch.stack([wy_low, wy_low, wy_high, wy_high], -1).view(k, ph, grid, 1, 1, 4)
    wx = torch.stack([wx_low, wx_high, wx_low, wx_high], -1).view(k, 1, 1, pw, grid, 4)
    image = rois[:, 0].long().view(k, 1, 1, 1, 1, 1)
    cols = image * (height * width) + ys * width + xs
    vals = wy * wx / (grid * grid)
    order = (0, 1, 3, 2, 4, 5)  # (roi, y bin, x bin, y sample, x sample, corner)
    return cols.permute(order).reshape(-1), vals.permute(order).reshape(-1), k * ph * pw


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from entries sorted by row (duplicates allowed: products sum them)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # "CSR support is in beta": the two products used here are tested against torchvision
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


class _SparseRoIAlign(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # as torchvision's op: float32 under autocast
    def forward(ctx, x: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, grid: int, aligned: bool) -> Tensor:
        b, c, h, w = x.shape
        cols, vals, n_rows = _sampling_matrix(rois, (b, h, w), output_size, spatial_scale, grid, aligned)
        rows = torch.arange(n_rows, device=x.device).repeat_interleave(grid * grid * 4)
        features = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        out = _csr(rows, cols, vals, (n_rows, b * h * w)) @ features
        ctx.save_for_backward(rows, cols, vals)
        ctx.shape = (b, c, h, w)
        return out.view(rois.shape[0], *output_size, c).permute(0, 3, 1, 2)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: Tensor):
        rows, cols, vals = ctx.saved_tensors
        b, c, h, w = ctx.shape
        order = torch.argsort(cols, stable=True)
        transposed = _csr(cols[order], rows[order], vals[order], (b * h * w, grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]))
        grad = transposed @ grad_out.permute(0, 2, 3, 1).reshape(-1, c)
        return grad.view(b, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None


def sparse_roi_align(
    x: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool = False
) -> Tensor:
    """``torchvision.ops.roi_align`` for a fixed ``sampling_ratio`` > 0; ``rois`` is (K, 5): image index, x1, y1, x2, y2."""
    if rois.shape[0] == 0:
        return x.new_zeros((0, x.shape[1], *output_size))
    out = _SparseRoIAlign.apply(x, rois, tuple(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned))
    return out.to(x.dtype)


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same levels, same arguments) with :func:`sparse_roi_align` where it applies."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if (
            features[0].device.type != "cpu"
            or self.sampling_ratio <= 0
            or torchvision._is_tracing()
            or torch.jit.is_scripting()
            or torch.compiler.is_compiling()
        ):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return sparse_roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            picked = torch.where(levels == level)[0]
            result[picked] = sparse_roi_align(feature, rois[picked], self.output_size, scale, self.sampling_ratio).to(result.dtype)
        return result


def use_sparse_roi_align(model: nn.Module) -> nn.Module:
    """Swap a torchvision detector's RoI poolers for :class:`SparseMultiScaleRoIAlign` (they hold no weights)."""
    heads = model.roi_heads
    for attr in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
        pool = getattr(heads, attr, None)
        if type(pool) is MultiScaleRoIAlign:
            setattr(
                heads,
                attr,
                SparseMultiScaleRoIAlign(
                    pool.featmap_names,
                    pool.output_size,
                    pool.sampling_ratio,
                    canonical_scale=pool.canonical_scale,
                    canonical_level=pool.canonical_level,
                ),
            )
    return model
