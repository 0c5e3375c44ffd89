"""rasterkube operator: the kopf control plane."""
