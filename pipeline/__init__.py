"""pipeline: distributed training of generative models (VDMs, GANs) for the physical sciences."""

__version__ = "0.1.0"
