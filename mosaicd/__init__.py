"""mosaicd: the Mosaic daemon (socket server, scheduler, worker pool, execution, store)."""
