"""Kubernetes API I/O shared by the operator and the forwarder."""
