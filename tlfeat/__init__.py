"""tlfeat: transfer learning with cached ImageNet CNN embeddings."""

__version__ = "0.1.0"
