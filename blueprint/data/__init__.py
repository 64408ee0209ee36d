"""The corpus: sources, (code, summary) extraction, shard workers, shard readers."""
