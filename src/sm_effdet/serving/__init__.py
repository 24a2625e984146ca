"""`serve`: the SageMaker hosting and Batch Transform server (FastAPI on uvicorn).

settings.py   every SERVE_* environment variable and its default
predictor.py  loading the model (the backend seam: torch, later ONNX), warm-up, one batched call
decoding.py   request bodies (raw image bytes, JSON, JSON Lines) and CustomAttributes
batching.py   dynamic batching of concurrent requests, bounded queue
formats.py    response bodies (JSON, JSON Lines, the built-in algorithm's format)
app.py        the routes (/ping, /invocations, /execution-parameters), logging, main()

May import: model (inference, model_card, preprocessing, artifacts) and the package's root
modules; never training/, data/ or launch/.
"""
