"""flowrl: Lightning modules for RL fine-tuning of flow-matching generative models."""

__version__ = "0.1.0"
