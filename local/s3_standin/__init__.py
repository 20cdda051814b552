"""Local S3 stand-in (SeaweedFS) and the boto3 data moves around it. Local-only: never in an image.

Run with `python -m s3_standin --help`.
"""
