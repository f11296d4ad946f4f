"""The machine-learning side of Seefood Studio: import, train, score, export.

The CLI (`python -m pipeline ...`) and the dashboard call the same functions.
"""
