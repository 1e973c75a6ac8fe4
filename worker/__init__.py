"""The worker side of adapter-merge: the merge engine and the task code that runs it for the service."""
