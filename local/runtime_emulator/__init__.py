"""Local stand-in for the SageMaker Runtime API (InvokeEndpoint and InvokeEndpointWithResponseStream).

Local-only: never copied into an image. Run with `python -m runtime_emulator --help`.
"""
