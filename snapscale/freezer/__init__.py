"""The freezer: captures a warmed sandbox into a signed, chunked checkpoint."""
