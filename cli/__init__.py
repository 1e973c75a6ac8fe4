"""`adapter-merge`: the one command line, on top of every layer (local merges, the server, the worker)."""
