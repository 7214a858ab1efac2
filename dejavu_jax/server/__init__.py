"""An OpenAI-compatible HTTP front end over the engine's online mode: `protocol` (request bodies,
errors, response chunks), `app` (the ASGI routes), `prom` (/metrics), `launch` (a server from an
experiment config; in a thread for tests and benchmarks). The layer above `studies`."""
