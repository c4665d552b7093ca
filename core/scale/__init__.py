"""Spreading one edit's sampling over several GPUs or machines (Ray actors), host-agnostic."""
