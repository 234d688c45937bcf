"""Metrics: classification (accuracy, per-class, confusion) and COCO (bbox/segm AP)."""
