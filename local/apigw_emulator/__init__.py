"""Local stand-in for API Gateway (REST v1 / HTTP API v2 proxy to Lambda); local-only."""
