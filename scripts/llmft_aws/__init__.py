"""Commands that take the project to AWS: push images, upload data, train, deploy, evaluate, clean up.

Run through `scripts/llmft-aws COMMAND --help` (in the main .venv, see docs/aws.md). Each module owns
one AWS concern; only `context` knows how credentials, region and role are found.
"""
