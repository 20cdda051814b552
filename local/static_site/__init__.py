"""CloudFront stand-in: serves web/ with the right content types and cache headers (local-only)."""
