"""Where models and adapters come from: local folders, a Hugging Face hub, S3, an MLflow registry.

Each kind of reference is one `Source`, registered by its URI scheme (built-in ones here, others through the
`adapter_merge.sources` entry-point group), behind one small interface: pin a reference to an immutable
version with its file list (at submit time, in the API), read a byte range of a pinned file (the API's
preflight reads only configs and safetensors headers), and download a pinned file (workers, into the cache).
"""
