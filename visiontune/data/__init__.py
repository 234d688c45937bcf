"""Datasets: image folders for classification, Penn-Fudan and COCO for detection."""
