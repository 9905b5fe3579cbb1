"""One module per qbitmap command; each defines a click command of that name."""
