"""Models: backbones (registry), classifier (backbone + head), detection (Mask/Faster R-CNN), weights."""
