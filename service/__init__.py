"""The web side of adapter-merge: FastAPI app, job store and settings. Never imports torch."""
