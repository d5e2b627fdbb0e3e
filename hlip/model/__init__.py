"""hlip.model."""
