"""sm-effdet: build, check, launch and follow this container's SageMaker jobs (boto3, no torch)."""
