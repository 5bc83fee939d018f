"""myrtle-vision classification: train, test and check Vision Transformers for FPGA deployment."""

__version__ = "0.1.0"
