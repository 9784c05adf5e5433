"""dsa_dist: training long-context language models with DeepSeek Sparse Attention (DSA).

The design is in docs/design.md; the README gives the overview. The reference math lives in :mod:`dsa_dist.ops`.
"""

__version__ = "0.1.0"
