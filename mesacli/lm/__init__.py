"""Language models with mesa-layers on real text (paper appendix G): specs, data, model, training, sampling."""
