"""Flower's strategies as fusers of fed-deq's round driver (fed-deq's own rules live in fed_deq/fusion.py)."""

from server.strategies.flower_rules import flower_strategy, robust_fuser

__all__ = ["flower_strategy", "robust_fuser"]
