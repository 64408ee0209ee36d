"""Where artifacts live: URIs, committed outputs, the commit lock, tensor state files."""
