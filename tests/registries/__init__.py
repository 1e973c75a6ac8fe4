"""Real registry servers on 127.0.0.1 for the registry-sources tests: a Hugging Face hub-compatible server
(`hub_server`), moto's S3 server (`s3_server`) and an MLflow tracking server (`mlflow_server`), each started
once per session by `conftest.py`, with the helpers the product tests need to fill them and to count requests."""
