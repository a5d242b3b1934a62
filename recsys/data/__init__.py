"""Data: sources (synthetic, MovieLens, TFDS), vocabularies, the split, features and batches."""
