"""``python -m qbitmap``."""

from qbitmap.cli import main

main()
