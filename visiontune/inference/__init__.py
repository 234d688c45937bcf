"""Using a trained run: load it (PyTorch model file or exported ONNX), evaluate it on labelled data, predict images."""
