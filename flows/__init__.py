"""dataengine Prefect flows and deployments."""
