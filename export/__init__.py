"""Training and ONNX export of deepalign-fast's models (needs torch; never shipped in the wheel)."""
