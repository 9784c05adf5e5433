"""dsa_dist: training long-context language models with DeepSeek Sparse Attention (DSA).

See ``DESIGN.md``-style overview in the README. The reference math lives in :mod:`dsa_dist.ops`.
"""

__version__ = "0.1.0"
