"""hlip.ingest."""
