"""One router per resource: merge, jobs, artifacts, health."""
