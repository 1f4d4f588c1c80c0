"""Scoring generated text: exact match, labels, and the pairwise judge's verdicts."""
