"""The network as data: the ResNet spec and zoo, and the torch / Keras builders and ONNX export built from it."""
