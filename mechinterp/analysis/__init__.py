"""Head-set metrics, correlations with bootstrap CIs, random-complement baselines, the
false-negative bound of an attribution screen, Wu JSON I/O."""
