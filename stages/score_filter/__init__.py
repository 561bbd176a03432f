"""score_filter: keep the pairs an image-text model scores highest (DataComp's and DFN's "CLIP score"
filtering); see stage.py (its operator) and config.py (its settings)."""
