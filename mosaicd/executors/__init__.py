"""What starts and talks to workers: the interface, the local pool, Ray."""
