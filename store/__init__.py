"""The chunk store: chunk records (chunk), content addresses (hashing), the Redis registry
(registry, redis_server) and KV files on disk (kv_file). Plain Python; no engine, no Ray."""
