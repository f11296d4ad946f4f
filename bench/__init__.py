"""`make bench`: the measured goals of Seefood Studio, side by side in one run."""
