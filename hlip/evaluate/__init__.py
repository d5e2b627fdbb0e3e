"""hlip.evaluate."""
