"""Training data: shards in (the loaders) and out (make-shards, encode-shards, the emoji set)."""
