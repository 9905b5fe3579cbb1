"""``python -m qbitmap``."""

from qbitmap.entry import main

main()
