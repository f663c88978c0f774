"""Orchestration and tools above the Flower adapters: the CLI, simulate, tune, compare, deploy."""
