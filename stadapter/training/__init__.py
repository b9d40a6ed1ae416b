"""Training and evaluation of adapter sets (ST-Adapter and the paper's Table 1 baselines)."""
