"""pipetrain.kernels: Triton kernels (fused optimizer updates, weight prediction) and their torch references."""
