"""hlip.shards."""
