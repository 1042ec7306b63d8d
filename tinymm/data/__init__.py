"""Synthetic, seeded data sets (shapes, sounds), the tokenizer, and batching."""
