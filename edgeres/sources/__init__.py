"""Readers of the model files users bring (PyTorch checkpoints, ONNX graphs, Keras models), each mapped to a spec + weights."""
