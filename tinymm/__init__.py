"""tinymm: a small, readable NumPy-only autograd framework for learning multimodal models."""
