"""hlip.train."""
