"""flowrl: Lightning modules for RL fine-tuning of flow-matching generative models."""

import logging

__version__ = "0.1.0"


class _SameProcessingWithoutTorchvision(logging.Filter):
    """transformers announces, when diffusers imports it, that its image processors fall back to their PIL versions
    where torchvision is missing: the same processing for every pipeline and reward flowrl uses, so the two lines
    it prints at every start say nothing to a flowrl user. Only that message is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_SameProcessingWithoutTorchvision())
