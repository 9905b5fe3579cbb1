"""qbitmap: inspect, check and repair persistent dirty bitmaps in qcow2 images."""

__version__ = "0.1.0"
