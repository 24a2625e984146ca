"""sm-effdet: build, check, launch and follow this container's SageMaker jobs (boto3, no torch):
the request and its checks (request.py, checks.py, validation.py), uploads, following, local
mode, tuning, deploy/transform/predict and the endpoints (cli.py lists the commands).

May import: data/formats (the local data check, torch-free), hyperparameters and the root's
errors; never training/, model/, serving/ or anything that imports torch.
"""
