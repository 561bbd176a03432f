"""The toy web, in one place: a procedural world of shapes (world.py), the HTTP server that renders it
on 127.0.0.1 (server.py), the URL lists, held-out and seed shards and truth file it writes (lists.py),
lookalike pictures for dedup tests (lookalikes.py) and the measures against its truth (measures.py).
The pipeline itself never reads the truth."""
