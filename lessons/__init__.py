"""The lesson scripts: `python lessons/01_attention.py`, or all of them with `python -m lessons`."""
