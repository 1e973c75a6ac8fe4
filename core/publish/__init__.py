"""Publishing a merged model to a registry: the target interface, lineage, and the built-in targets."""
