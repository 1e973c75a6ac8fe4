"""The HTTP API (FastAPI) on the job core: validates and queues merges, serves jobs and results.

Never imports torch, nor the worker's code: it publishes merge messages by task name.
"""
