"""lens_callbacks: capture the real training step with lens_core, at chosen steps.

The Lightning callback, the plain-loop driver and the TensorBoard / W&B / disk writers arrive
with their issues (#5, #6); this package already installs so that its name is reserved.
"""

__all__: list[str] = []
