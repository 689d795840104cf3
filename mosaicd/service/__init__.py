"""The daemon's process: its loop, sockets and request handlers (root on a shared box)."""
