"""snapscale: scale GPU inference to zero and back in seconds.

The subpackages are symlinks to the top-level folders services/* and shared/.
"""

__version__ = "0.1.0"
