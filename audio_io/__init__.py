"""Audio input/output helpers. This package never imports torch."""
