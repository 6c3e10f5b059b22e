"""Dirty bitmaps (block-dirty-bitmap-*): `core` is the pure bit array, `registry` the named
bitmaps of each node and the write-path hook, `actions` their transaction actions."""
