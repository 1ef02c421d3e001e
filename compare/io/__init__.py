"""Files: weights (``checkpoint``: safetensors and ``torch.load(weights_only=True)``, atomic
writes), full training state for exact resume (``train_state``), and conversion between the
frameworks' files (``convert``; the command line is ``python -m compare.convert``)."""

__all__ = ["checkpoint", "convert", "train_state"]
