"""Head-set metrics, correlations with bootstrap CIs, random-complement baselines, Wu JSON I/O."""
