"""The lowest stages: scanning a dataset folder into a stable split, and decoding images into pixels."""
