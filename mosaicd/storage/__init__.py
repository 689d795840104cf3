"""Where a study is written: the study database, the daemon's own state, the one writer."""
