"""ONNX export with DHSA as custom ops of the ``ai.edgeattn`` domain."""
