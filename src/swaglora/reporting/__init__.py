"""The parts of :mod:`swaglora.report`: load, collect, render, figures (the public API is there)."""
