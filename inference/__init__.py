"""Serving-time code shared by the service and by training's evaluation of the exported model.

Nothing in this package imports torch: the service image holds ONNX Runtime, not the training stack.
"""
