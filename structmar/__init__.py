"""structmar: the training system for StructMAR, a layout-to-image masked autoregressive model."""

__version__ = "0.1.0"
