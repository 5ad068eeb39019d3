"""Data: generated corpora, tokenizers and grain pipelines."""
