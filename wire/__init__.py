"""What the Flower adapters (``clients/`` and ``server/``) both speak: records <-> numpy, and the message keys.

The only module both adapters may import; it imports Flower and the core, never an adapter.
"""
