"""balance: MetaCLIP's balancing of concepts (captions matched against entries, each entry capped at t
samples); see stage.py (its operator) and config.py (its settings)."""
