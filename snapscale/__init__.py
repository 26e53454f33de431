"""snapscale: scale GPU inference to zero and back in seconds.

The code lives here (one path per file); the top-level folders services/* and shared/ are symlinks
into this package, so the layout the users asked for still shows it.
"""

__version__ = "0.1.0"
