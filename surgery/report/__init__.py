"""What users look at: figures (plots), model cards (cards), grouped notes and quality warnings (checks).

Torch-free at import; matplotlib is imported when a figure is drawn (the `plot` extra).
"""
