"""What recipes/evaluate.py is made of: the models under evaluation (torch or ONNX Runtime), the
cells (one model on one task) and the table they make."""
