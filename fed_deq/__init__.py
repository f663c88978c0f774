"""fed-deq: federated learning with deep-equilibrium clients on heterogeneous devices."""

__version__ = "0.1.0"
