"""The diffusion process: schedules (numbers only), the forward process and losses, samplers, and the fused ops."""
