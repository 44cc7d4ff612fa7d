"""Job configuration (vzdump.conf, storage.cfg, jobs.cfg), calendar events, locks and hooks."""
