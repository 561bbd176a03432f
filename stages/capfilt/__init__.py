"""capfilt: see stage.py (its declaration and code) and config.py (its settings)."""
