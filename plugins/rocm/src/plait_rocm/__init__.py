"""plait on AMD GPUs: the device answer for ROCm builds of torch (see README.md)."""
