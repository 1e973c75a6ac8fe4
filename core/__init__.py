"""The job core: jobs and their state rules, stores, data layout, references, preflight, settings.

Knows neither HTTP nor Celery; the API (`adapter_merge.service`) and the workers (`adapter_merge.worker`)
both stand on it.
"""
