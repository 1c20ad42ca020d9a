"""Pure model code: Freeze-Omni model definitions, checkpoint loading, quantization, ONNX.

Nothing in this package imports audio devices, threads or asyncio, and nothing here
configures logging. Device and dtype are always passed in by the caller.
"""
