"""Training stage: dataset folder -> fine-tuned backbone -> ONNX -> BentoML model store."""
