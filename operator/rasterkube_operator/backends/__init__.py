"""Backends that run rasterkube jobs on Ray: ``ray`` (Ray Jobs API) and ``kuberay`` (RayJob CRs)."""
