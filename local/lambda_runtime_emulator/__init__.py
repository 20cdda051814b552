"""Local stand-in for AWS Lambda: the Invoke API plus a Runtime API for awslambdaric (local-only)."""
