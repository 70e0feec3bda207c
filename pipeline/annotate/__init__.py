"""Annotation rounds: the manual, semi-automatic and automatic stages, annotators, exports."""
