"""Evaluation: metrics, benchmark runners, zero/few-shot protocols, inference."""
