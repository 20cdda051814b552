"""Question-answering Lambda function between API Gateway and a SageMaker endpoint.

Handler: `qa_function.handler.handler`. Package the contents of lambda/src/ (this folder) as the code.
"""
