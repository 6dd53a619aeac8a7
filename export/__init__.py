"""effdet-export: EfficientDet to ONNX, torch.export (.pt2) and back to the official TF formats."""
