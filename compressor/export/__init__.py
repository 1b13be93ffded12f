"""ONNX export of plain and converted Vision Mamba models, checked against PyTorch with ONNX Runtime."""

from .onnx import ExportReport, check_onnx_file, check_onnx_input, export_onnx

__all__ = ["ExportReport", "export_onnx", "check_onnx_file", "check_onnx_input"]
